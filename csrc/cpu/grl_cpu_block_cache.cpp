// grl_cpu_block_cache.cpp -- large CPU tensor blocks kept for reuse inside inference scopes.
//
// Why: a GRL forward allocates and frees the same few activation-sized blocks in every
// transformer block. Kept in glibc's heap they fragment it (peak RSS 1.5-1.8x the live tensors
// on GRL-B); given back by munmap, each new block is faulted in page by page on first touch.
//
// What: an allocator installed in front of PyTorch's CPU allocator (c10::SetCPUAllocator) the
// first time a scope is entered. While at least one scope is open (enter/exit counts, from
// grl_kernels.heap), requests of at least `min_bytes` are served here:
//   * a cached block of the same page-rounded size is reused when there is one; else the
//     smallest cached block of up to `max_fit` times the size is handed over whole, counted at
//     its own size (grl_kernels.heap: 2 in compiled calls, whose activations come in a few sizes,
//     4-16 MiB on GRL-T, used in turn, so that cutting a block to fit and growing it back later
//     faulted its tail in again; 1, exact sizes only, in eager calls and under a memory budget);
//   * else, when (bytes in use + bytes cached + the request) stays within the bound, the scope's
//     high-water mark of bytes in use times (1 + slack), a new block is mapped with MAP_POPULATE
//     (its pages filled in one kernel call, no fault per page);
//   * else the cached block closest in size is resized to the request (munmap of its tail, or
//     mremap plus MADV_POPULATE_WRITE of the difference: its resident pages are reused), after
//     unmapping other cached blocks, least recently freed first, as far as the bound needs.
// Freed blocks go to the cache, which is trimmed to the same bound. So the resident bytes of
// these blocks never exceed (1 + slack) x the peak of those in use: the process's peak RSS
// follows its live-tensor peak instead of the heap's fragmentation, and most requests of a
// forward reuse the previous transformer block's blocks. The last exit unmaps the cache;
// blocks still in use are unmapped when freed. Every other request, and every request outside
// scopes, is served as PyTorch's default CPU allocator serves it (c10::alloc_cpu, with its
// profiler reports). Every block carries the one deleter this allocator names as its raw
// deleter (oneDNN/ideep allocates through raw_allocate / raw_deallocate): it tells this cache's
// blocks from the others by their address. Installed only in front of PyTorch's default
// allocator, never in front of another one.
#include "grl_cpu_common.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <list>
#include <mutex>
#include <unordered_map>

namespace grl {
namespace cpu {
namespace {

struct CachedBlock {
  void* ptr;
  size_t size;
};

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (depth_.load(std::memory_order_acquire) > 0 && n >= min_bytes_.load(std::memory_order_relaxed)) p = take(round_up(n));
    if (!p) {  // what c10's DefaultCPUAllocator does
      try {
        p = c10::alloc_cpu(n);
      } catch (c10::Error&) {
        c10::profiledCPUMemoryReporter().OutOfMemory(n);
        throw;
      }
    }
    c10::profiledCPUMemoryReporter().New(p, n);
    return {p, p, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void enter(size_t min_bytes, double slack, double max_fit) {
    std::lock_guard<std::mutex> g(mu_);
    if (depth_.load() == 0) {
      min_bytes_.store(std::max<size_t>(min_bytes, page()), std::memory_order_relaxed);
      slack_ = slack;
      max_fit_ = max_fit;
      hwm_ = in_use_;
    }
    depth_.fetch_add(1, std::memory_order_acq_rel);
  }

  void exit() {
    std::lock_guard<std::mutex> g(mu_);
    if (depth_.load() == 0) return;
    if (depth_.fetch_sub(1, std::memory_order_acq_rel) == 1) trim_to(0);
  }

  std::unordered_map<std::string, int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {{"depth", depth_.load()}, {"in_use_bytes", (int64_t)in_use_}, {"cached_bytes", (int64_t)cached_},
            {"high_water_bytes", (int64_t)hwm_}, {"peak_resident_bytes", (int64_t)peak_resident_},
            {"hits", hits_}, {"fits", fits_}, {"maps", maps_}, {"unmaps", unmaps_}, {"resizes", resizes_}, {"mapped_bytes", mapped_bytes_},
            {"min_bytes", (int64_t)min_bytes_.load()}};
  }

  void reset_peak() {
    std::lock_guard<std::mutex> g(mu_);
    peak_resident_ = in_use_ + cached_;
    hits_ = fits_ = maps_ = unmaps_ = resizes_ = mapped_bytes_ = 0;
  }

  static BlockCache* instance;

 private:
  static size_t page() {
    static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return p;
  }
  static size_t round_up(size_t n) { return (n + page() - 1) / page() * page(); }

  static size_t dist(size_t a, size_t b) { return a > b ? a - b : b - a; }

  size_t bound() const { return static_cast<size_t>(static_cast<double>(hwm_) * (1.0 + slack_)); }

  // unmap cached blocks, least recently freed first, until cached + in use + extra <= limit
  void trim_to(size_t limit, size_t extra = 0) {
    while (!lru_.empty() && in_use_ + cached_ + extra > limit) {
      CachedBlock b = lru_.front();
      lru_.pop_front();
      cached_ -= b.size;
      munmap(b.ptr, b.size);
      ++unmaps_;
    }
  }

  void* take(size_t size) {
    std::lock_guard<std::mutex> g(mu_);
    // the most recently freed block of this size, else the smallest of up to max_fit x the size
    const double most = max_fit_ * static_cast<double>(size);
    auto fit = lru_.end();
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
      if (it->size < size || static_cast<double>(it->size) > most) continue;
      if (fit == lru_.end() || it->size <= fit->size) fit = it;
    }
    if (fit != lru_.end()) {
      CachedBlock b = *fit;
      lru_.erase(fit);
      cached_ -= b.size;
      note_in_use(b.ptr, b.size);
      ++(b.size == size ? hits_ : fits_);
      return b.ptr;
    }
    hwm_ = std::max(hwm_, in_use_ + size);
    if (!lru_.empty() && in_use_ + cached_ + size > bound()) {
      // no room for a new block: resize the cached block closest in size instead (its pages
      // are resident already: shrinking unmaps the tail, growing faults in only the difference)
      auto best = lru_.begin();
      for (auto it = lru_.begin(); it != lru_.end(); ++it)
        if (dist(it->size, size) < dist(best->size, size)) best = it;
      CachedBlock b = *best;
      lru_.erase(best);
      cached_ -= b.size;
      ++resizes_;
      if (b.size > size) {
        munmap(static_cast<char*>(b.ptr) + size, b.size - size);
        note_in_use(b.ptr, size);
        return b.ptr;
      }
      trim_to(bound(), size);
      void* q = mremap(b.ptr, b.size, size, MREMAP_MAYMOVE);
      if (q != MAP_FAILED) {
#ifdef MADV_POPULATE_WRITE
        madvise(static_cast<char*>(q) + b.size, size - b.size, MADV_POPULATE_WRITE);  // else: faults on touch
#endif
        mapped_bytes_ += static_cast<int64_t>(size - b.size);
        note_in_use(q, size);
        return q;
      }
      munmap(b.ptr, b.size);
      ++unmaps_;
    }
    trim_to(bound(), size);
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
      trim_to(0);  // no memory: drop the cache and let the fallback allocator try (and report)
      return nullptr;
    }
    ++maps_;
    mapped_bytes_ += static_cast<int64_t>(size);
    note_in_use(p, size);
    return p;
  }

  void note_in_use(void* p, size_t size) {
    live_[p] = size;
    n_live_.fetch_add(1, std::memory_order_acq_rel);
    in_use_ += size;
    hwm_ = std::max(hwm_, in_use_);
    peak_resident_ = std::max(peak_resident_, in_use_ + cached_);
  }

  static void release(void* p) {
    if (!p) return;
    c10::profiledCPUMemoryReporter().Delete(p);
    if (!instance->give_back(p)) c10::free_cpu(p);
  }

  // true when p is one of this cache's blocks (now cached or unmapped)
  bool give_back(void* p) {
    if (n_live_.load(std::memory_order_acquire) == 0) return false;
    std::lock_guard<std::mutex> g(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return false;
    const size_t size = it->second;
    live_.erase(it);
    n_live_.fetch_sub(1, std::memory_order_acq_rel);
    in_use_ -= size;
    if (depth_.load() == 0) {
      munmap(p, size);
      ++unmaps_;
      return true;
    }
    lru_.push_back({p, size});
    cached_ += size;
    trim_to(bound());
    return true;
  }

  std::mutex mu_;
  std::atomic<int> depth_{0};
  std::atomic<size_t> min_bytes_{1 << 20};
  double slack_ = 0.0;
  double max_fit_ = 1.0;
  std::list<CachedBlock> lru_;             // cached blocks, least recently freed first
  std::unordered_map<void*, size_t> live_;  // blocks in use -> size
  std::atomic<size_t> n_live_{0};           // live_.size(), read without the lock by release()
  size_t in_use_ = 0, cached_ = 0, hwm_ = 0, peak_resident_ = 0;
  int64_t hits_ = 0, fits_ = 0, maps_ = 0, unmaps_ = 0, resizes_ = 0, mapped_bytes_ = 0;
};

BlockCache* BlockCache::instance = nullptr;
std::mutex install_mu;

// the cache, installed on first use; nullptr where another allocator than PyTorch's default is
// in use (that one is left alone)
BlockCache* installed() {
  std::lock_guard<std::mutex> g(install_mu);
  if (!BlockCache::instance) {
    if (c10::GetCPUAllocator() != c10::GetDefaultCPUAllocator()) return nullptr;
    // owned for the life of the process (c10 keeps a raw pointer), with a priority above the
    // default allocator's; blocks the default one gave out before keep their own deleter
    BlockCache::instance = new BlockCache();
    c10::SetCPUAllocator(BlockCache::instance, /*priority=*/1);
  }
  return BlockCache::instance;
}

}  // namespace

bool block_cache_enter(int64_t min_bytes, double slack, double max_fit) {
  TORCH_CHECK(min_bytes > 0, "block_cache_enter: min_bytes must be positive, got ", min_bytes);
  TORCH_CHECK(slack >= 0.0, "block_cache_enter: slack must be >= 0, got ", slack);
  TORCH_CHECK(max_fit >= 1.0, "block_cache_enter: max_fit must be >= 1, got ", max_fit);
  BlockCache* c = installed();
  if (!c) return false;
  c->enter(static_cast<size_t>(min_bytes), slack, max_fit);
  return true;
}

void block_cache_exit() {
  if (BlockCache::instance) BlockCache::instance->exit();
}

std::unordered_map<std::string, int64_t> block_cache_stats(bool reset_peak) {
  BlockCache* c = BlockCache::instance;
  if (!c) return {{"installed", 0}};
  auto s = c->stats();
  s["installed"] = 1;
  if (reset_peak) c->reset_peak();
  return s;
}

}  // namespace cpu
}  // namespace grl
