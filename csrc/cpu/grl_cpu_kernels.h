// grl_cpu_kernels.h -- numeric helpers of the fused CPU kernels, compiled once PER ISA.
//
// Deliberately no include guard: every kernel file includes this header (through its
// *_impl.h) several times, each time inside a `#pragma GCC target` region and with
// GRL_ISA naming the namespace of that instruction set (see grl_cpu_isa.h), so a portable
// build (no -march=native) still holds AVX2 and AVX-512 code, chosen at run time.
// Everything used here is defined here (or is a default-target std/c10 inline, which may
// be inlined into any ISA): no ISA-specific code leaks into shared COMDAT symbols.
//
// GRL_ISA_LEVEL: 0 baseline x86-64 / other architectures, 1 AVX2+FMA, 2 AVX-512 with
// AVX512-BF16 (vdpbf16ps tiles for bfloat16 inputs).
//
// Inner loops run over a contiguous dimension (head dim d, a token block or the anchors
// of a window) so the compiler vectorizes them for the region's ISA; exp is a branch-free
// polynomial that vectorizes too (std::exp does not).

namespace grl {
namespace cpu {
namespace GRL_ISA {

#define GRL_INLINE inline __attribute__((always_inline))

// exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, degree-6 Taylor
// polynomial for e^r (relative error < 2e-7, below float32 rounding of the
// softmax sums); x below -87.3 (2^-126) returns 0. Written without calls or
// branches so loops over it vectorize.
static GRL_INLINE float exp_fast(float x) {
  const float lo = -87.3365f, hi = 88.0f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606820309417232e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &e, sizeof(s));
  return x < lo ? 0.0f : p * s;
}

static inline double exp_fast(double x) { return std::exp(x); }

template <typename acc_t>
static GRL_INLINE acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Row reductions with 16 independent partial results, so that they vectorize without
// -ffast-math (a single running max / sum is a serial dependency the compiler must keep).
template <typename T>
static GRL_INLINE T row_max(const T* x, int64_t n) {
  T part[16];
  for (int k = 0; k < 16; ++k) part[k] = neg_inf<T>();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) part[k] = x[j + k] > part[k] ? x[j + k] : part[k];
  T m = neg_inf<T>();
  for (int k = 0; k < 16; ++k) m = part[k] > m ? part[k] : m;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <typename T>
static GRL_INLINE T row_sum(const T* x, int64_t n) {
  T part[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) part[k] += x[j + k];
  T s = 0;
  for (int k = 0; k < 16; ++k) s += part[k];
  for (; j < n; ++j) s += x[j];
  return s;
}

template <typename T>
static GRL_INLINE T row_dot(const T* x, const T* y, int64_t n) {
  T part[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int k = 0; k < 16; ++k) part[k] += x[j + k] * y[j + k];
  T s = 0;
  for (int k = 0; k < 16; ++k) s += part[k];
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

// Rows' sums of squares, row_dot(x, x, d), to out[0], out[1], ... in the order pushed
// (the float32 AVX-512 copy below reduces 16 rows at a time, with the same bits).
template <typename acc_t>
struct SumSqRows {
  acc_t* out;
  explicit SumSqRows(acc_t* o) : out(o) {}
  GRL_INLINE void push_row(const acc_t* x, int64_t d) { *out++ = row_dot(x, x, d); }
  GRL_INLINE void finish() {}
};

#if GRL_ISA_LEVEL >= 2
// float32 rows on AVX-512, written with intrinsics: the generic loops above compile to
// 8-lane ymm code (GCC's 256-bit preference for AVX-512 targets) or, for the max, to 16
// scalar vmaxss. Same operations as the scalar code: exp_fast step by step (FMA where the
// compiler contracts it), a max that skips NaN like `x > m ? x : m` (a NaN logit makes the
// row NaN either way); the sums reduce in lane-tree order instead of the generic 16
// partials' order (last-bit differences only). Whole-vector stores only where the row is
// read back at once: a masked store does not forward to a later full load (tried for the
// 8-wide logit runs of window 8: the kernels got 1.2-1.5x slower).
static GRL_INLINE __mmask16 tail_mask16(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
}

static GRL_INLINE __m512 exp_fast16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3365f), shifter = _mm512_set1_ps(12582912.0f);
  // max(lo, x) / min(hi, .) return their second operand when one is NaN: NaN stays NaN
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(lo, x));
  const __m512 t = _mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f));
  const __m512 nn = _mm512_sub_ps(_mm512_add_ps(t, shifter), shifter);  // round to nearest integer
  __m512 r = _mm512_fnmadd_ps(nn, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(nn, _mm512_set1_ps(1.428606820309417232e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(nn), _mm512_set1_epi32(127)), 23);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  return _mm512_maskz_mul_ps(__mmask16(~under), p, _mm512_castsi512_ps(e));
}

static GRL_INLINE float row_max(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(_mm512_loadu_ps(x + j), m);  // NaN x: keeps m
  if (j < n) {
    const __mmask16 k = tail_mask16(n - j);
    m = _mm512_mask_max_ps(m, k, _mm512_maskz_loadu_ps(k, x + j), m);
  }
  return _mm512_reduce_max_ps(m);
}

static GRL_INLINE float exp_shift_sum(float* x, int64_t n, float mx) {
  const __m512 m = _mm512_set1_ps(mx);
  __m512 s = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp_fast16(_mm512_sub_ps(_mm512_loadu_ps(x + j), m));
    _mm512_storeu_ps(x + j, e);
    s = _mm512_add_ps(s, e);
  }
  if (j < n) {
    const __mmask16 k = tail_mask16(n - j);
    const __m512 e = exp_fast16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), m));
    _mm512_mask_storeu_ps(x + j, k, e);
    s = _mm512_mask_add_ps(s, k, s, e);
  }
  return _mm512_reduce_add_ps(s);
}

// Dot product in 16 lanes (the generic row_dot's 16 partials came back as a serial chain of
// 16 scalar adds: 13 % of a window-8 forward, in the norms of d = 16 rows).
// row_dot16: the 16 lane partials (one FMA chain), before the reduction.
static GRL_INLINE __m512 row_dot16(const float* x, const float* y, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(y + j), s);
  if (j < n) {
    const __mmask16 k = tail_mask16(n - j);
    s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + j), _mm512_maskz_loadu_ps(k, y + j), s);
  }
  return s;
}

static GRL_INLINE float row_dot(const float* x, const float* y, int64_t n) {
  return _mm512_reduce_add_ps(row_dot16(x, y, n));
}

// Lane r = _mm512_reduce_add_ps(p[r]), bit for bit, for 16 vectors at once: GCC's reduction adds
// lane i to lane i + 8, then i + 4, i + 2 and i + 1 (float addition commutes exactly, so only this
// pairing matters); here each level pairs the same lanes of two rows' partials in one add (15 adds
// and 30 shuffles for 16 rows instead of 64 dependent steps).
static GRL_INLINE __m512 reduce_add_16rows(const __m512 (&p)[16]) {
  __m512 t1[8], t2[4], t3[2];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)  // rows 2k, 2k + 1: their 8 partials a_i + a_(i+8) in each half
    t1[k] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m)  // rows 4m .. 4m + 3, one per 128-bit lane: + i + 4
    t2[m] = _mm512_add_ps(_mm512_shuffle_f32x4(t1[2 * m], t1[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(t1[2 * m], t1[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)));
#pragma GCC unroll 2
  for (int n = 0; n < 2; ++n)  // + i + 2: 128-bit lane l holds rows 8n + l (elements 0, 1) and 8n + 4 + l
    t3[n] = _mm512_add_ps(_mm512_shuffle_ps(t2[2 * n], t2[2 * n + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_ps(t2[2 * n], t2[2 * n + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // + i + 1: element 4l + e holds row l + 4e; back to row order
  const __m512 t4 = _mm512_add_ps(_mm512_shuffle_ps(t3[0], t3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_ps(t3[0], t3[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), t4);
}

// SumSqRows of float32 rows: row_dot's 16 lane partials per row, reduced 16 rows at a time
// (finish() writes a last partial group).
template <>
struct SumSqRows<float> {
  __m512 part[16];
  int k = 0;
  float* out;
  explicit SumSqRows(float* o) : out(o) {}
  GRL_INLINE void push(__m512 p) {
    part[k++] = p;
    if (k == 16) flush();
  }
  GRL_INLINE void push_row(const float* x, int64_t d) { push(row_dot16(x, x, d)); }
  GRL_INLINE void flush() {
    if (k == 0) return;
    for (int r = k; r < 16; ++r) part[r] = _mm512_setzero_ps();
    _mm512_mask_storeu_ps(out, tail_mask16(k), reduce_add_16rows(part));
    out += k;
    k = 0;
  }
  GRL_INLINE void finish() { flush(); }
};

// 16 floats -> bf16 bits, round to nearest even, NaN kept quiet (float_to_bf16_bits per lane)
static GRL_INLINE __m256i bf16_bits16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}
#endif

// x[j] = exp(x[j] - m) in place; returns the sum.
template <typename T>
static GRL_INLINE T exp_shift_sum(T* x, int64_t n, T m) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_fast(x[j] - m);
  return row_sum(x, n);
}

// Exact softmax of a complete row: row[j] = exp(row[j] - max) in place, then the normalized
// probabilities into out (product type U: out may alias row when U == T).
template <typename T, typename U, typename From>
static GRL_INLINE void softmax_to(T* row, int64_t n, U* out, const From& from) {
  const T sum = exp_shift_sum(row, n, row_max(row, n));
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < n; ++j) out[j] = from(row[j] * inv);
}

#if GRL_ISA_LEVEL >= 2
// float32 rows into float32 (in place) or bf16-bit products on AVX-512 (`from` is the
// layout's conversion, float_to_bf16_bits lane by lane here)
template <typename U, typename From>
static GRL_INLINE void softmax_to(float* row, int64_t n, U* out, const From& from) {
  static_assert(std::is_same<U, float>::value || std::is_same<U, uint16_t>::value, "float or bf16-bit products");
  const float sum = exp_shift_sum(row, n, row_max(row, n));
  const __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask16(n - j);
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + j), inv);
    if constexpr (std::is_same<U, float>::value) {
      _mm512_mask_storeu_ps(out + j, k, p);
    } else {
      _mm256_mask_storeu_epi16(out + j, k, bf16_bits16(p));
    }
  }
  (void)from;
}
#endif

// bfloat16 <-> float32 on the raw bits (round to nearest even; NaN stays NaN). Plain
// integer code that vectorizes, unlike c10::BFloat16's conversions.
static GRL_INLINE float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

static GRL_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
}

// Two rows a, b (K indices 2p, 2p + 1) of a bf16 B operand in the VNNI pair layout:
// out[2 j] = bf16(sa a[j]), out[2 j + 1] = bf16(sb b[j]) (b == nullptr: the zero pad row).
static GRL_INLINE void pack_pair_bf16(const float* __restrict a, float sa, const float* __restrict b, float sb, int64_t n,
                                          uint16_t* __restrict out) {
  if (b) {
    for (int64_t j = 0; j < n; ++j) {
      out[2 * j] = float_to_bf16_bits(sa * a[j]);
      out[2 * j + 1] = float_to_bf16_bits(sb * b[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      out[2 * j] = float_to_bf16_bits(sa * a[j]);
      out[2 * j + 1] = 0;
    }
  }
}

// r[0:d] = src[0:d * stride:stride] converted to the accumulation type; the common
// contiguous case (channel stride 1) gets its own loop, which vectorizes.
// float32 and bfloat16 rows on AVX-512 with channel stride 1 are stored as whole 16-lane
// vectors, the last one zero-filled: r must have room for pad16(d) entries (every caller's
// row is a kMaxStackD buffer or a pad16(d)-wide tile row). GCC's ymm halves, or a masked
// tail store, do not forward to the 16-wide loads that read the row next (row_dot16, the
// tile copies): a stall on every gathered row, ~5 % of a float32 stripe forward.
template <typename scalar_t, typename acc_t>
static GRL_INLINE void load_row(const scalar_t* __restrict src, int64_t stride, int64_t d, acc_t* __restrict r) {
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
    if (stride == 1) {
      for (int64_t c = 0; c < d; c += 16) _mm512_storeu_ps(r + c, _mm512_maskz_loadu_ps(tail_mask16(d - c), src + c));
      return;
    }
  }
#endif
  if (stride == 1) {
    for (int64_t c = 0; c < d; ++c) r[c] = static_cast<acc_t>(src[c]);
  } else {
    for (int64_t c = 0; c < d; ++c) r[c] = static_cast<acc_t>(src[c * stride]);
  }
}

template <typename acc_t>
static GRL_INLINE void load_row(const c10::BFloat16* __restrict src, int64_t stride, int64_t d, acc_t* __restrict r) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<acc_t, float>::value) {
    if (stride == 1) {  // whole 16-lane vectors, zero-filled past d (see load_row above)
      for (int64_t c = 0; c < d; c += 16) {
        const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail_mask16(d - c), s + c));
        _mm512_storeu_ps(r + c, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
      }
      return;
    }
  }
#endif
  if (stride == 1) {
    for (int64_t c = 0; c < d; ++c) r[c] = bf16_bits_to_float(s[c]);
  } else {
    for (int64_t c = 0; c < d; ++c) r[c] = bf16_bits_to_float(s[c * stride]);
  }
}

// o[0:d] = bf16 bits of src[0:d] (float_to_bf16_bits; 16 lanes at a time on AVX-512, whose
// scalar loop GCC does not vectorize).
static GRL_INLINE void bf16_bits_row(const float* __restrict src, uint16_t* __restrict o, int64_t d) {
#if GRL_ISA_LEVEL >= 2
  for (int64_t c = 0; c < d; c += 16) {
    const __mmask16 k = tail_mask16(d - c);
    _mm256_mask_storeu_epi16(o + c, k, bf16_bits16(_mm512_maskz_loadu_ps(k, src + c)));
  }
#else
  for (int64_t c = 0; c < d; ++c) o[c] = float_to_bf16_bits(src[c]);
#endif
}

// A row of a product tile from the accumulation type: a copy, or bf16 bits.
template <typename acc_t>
static GRL_INLINE void to_tile_row(const acc_t* __restrict src, acc_t* __restrict dst, int64_t d) {
  for (int64_t c = 0; c < d; ++c) dst[c] = src[c];
}
static GRL_INLINE void to_tile_row(const float* __restrict src, uint16_t* __restrict dst, int64_t d) {
  bf16_bits_row(src, dst, d);
}

// dst[0:d] = src[0:d] converted to the storage type (contiguous destination).
template <typename scalar_t, typename acc_t>
static GRL_INLINE void store_row(scalar_t* __restrict dst, const acc_t* __restrict src, int64_t d) {
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(src[c]);
}

template <typename acc_t>
static GRL_INLINE void store_row(c10::BFloat16* __restrict dst, const acc_t* __restrict src, int64_t d) {
  uint16_t* o = reinterpret_cast<uint16_t*>(dst);
  if constexpr (std::is_same<acc_t, float>::value) {
    bf16_bits_row(src, o, d);
  } else {
    for (int64_t c = 0; c < d; ++c) o[c] = float_to_bf16_bits(static_cast<float>(src[c]));
  }
}

// Software prefetch of the cache lines of one row of d elements (stride in elements).
constexpr int64_t kPrefetch = 16;  // rows ahead
// kLocality 3 (the default) fetches into L1 for the next rows; 2 into L2, for the rows of the
// NEXT task, issued a whole task ahead (DRAM latency is longer than the time a few rows take).
template <int kLocality = 3, typename scalar_t>
static GRL_INLINE void prefetch_row(const scalar_t* p, int64_t d, int64_t stride) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = (d - 1) * stride * static_cast<int64_t>(sizeof(scalar_t)) + sizeof(scalar_t);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, kLocality);
  __builtin_prefetch(c + bytes - 1, 0, kLocality);  // the last line when the row straddles one more
}

// Same for a contiguous row about to be written (prefetch with intent to write).
template <int kLocality = 3, typename scalar_t>
static GRL_INLINE void prefetch_row_for_write(scalar_t* p, int64_t d) {
  char* c = reinterpret_cast<char*>(p);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 1, kLocality);
  __builtin_prefetch(c + bytes - 1, 1, kLocality);
}

// F.normalize: returns ||x|| and scales x in place by 1 / max(||x||, eps).
template <typename acc_t>
static GRL_INLINE acc_t normalize_inplace(acc_t* x, int64_t d) {
  const acc_t n = std::sqrt(row_dot(x, x, d));  // 16 partial sums: vectorizes
  const acc_t inv = acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
  for (int64_t c = 0; c < d; ++c) x[c] *= inv;
  return n;
}

// 1 / max(||x||, eps): the forwards keep raw rows in their product tiles (bfloat16 inputs
// stay exact) and scale the cosines by these in float32 afterwards.
template <typename acc_t>
static GRL_INLINE acc_t inv_norm(const acc_t* x, int64_t d) {
  const acc_t n = std::sqrt(row_dot(x, x, d));
  return acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
}

// Backward of x_hat = x / max(||x||, eps): given g = dL/dx_hat, x_hat and ||x||,
// dL/dx = (g - x_hat (x_hat . g)) / ||x|| when ||x|| > eps, else g / eps.
// Writes the result into g.
template <typename acc_t>
static GRL_INLINE void normalize_backward_inplace(acc_t* g, const acc_t* xhat, acc_t n, int64_t d) {
  if (n > acc_t(kNormEps)) {
    const acc_t dot = row_dot(xhat, g, d);
    const acc_t inv = acc_t(1) / n;
    for (int64_t c = 0; c < d; ++c) g[c] = (g[c] - xhat[c] * dot) * inv;
  } else {
    const acc_t inv = acc_t(1) / acc_t(kNormEps);
    for (int64_t c = 0; c < d; ++c) g[c] *= inv;
  }
}

// The k and v gradients of n token rows from their transposed (d x n, row stride ld) sums: dk =
// the normalize backward of column j of dK^T (k_hat rows kh with stride dp, norms kn), dv =
// column j of dV^T; stored at kdst(j) and kdst(j) + C (the k and v parts of a qkv gradient row).
template <typename acc_t, typename Dst>
static GRL_INLINE void store_kv_grads_transposed(const acc_t* dKT, const acc_t* dVT, int64_t ld, int64_t n,
                                                 const acc_t* kh, int64_t dp, const acc_t* kn, int64_t d, int64_t C,
                                                 const Dst& kdst) {
  acc_t dkr[kMaxStackD], dvr[kMaxStackD];
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t c = 0; c < d; ++c) dkr[c] = dKT[c * ld + j], dvr[c] = dVT[c * ld + j];
    normalize_backward_inplace(dkr, kh + j * dp, kn[j], d);
    auto* gk = kdst(j);
    store_row(gk, dkr, d);
    store_row(gk + C, dvr, d);
  }
}

// Round the head dim up to a multiple of 16 (scratch rows are zero-padded to it so the
// GEMM micro-kernels below always work on full 16-wide column tiles).
static GRL_INLINE int64_t pad16(int64_t d) { return (d + 15) / 16 * 16; }

// Bytes per vector of the register tiles: one zmm on AVX-512, one ymm otherwise (the
// baseline splits it into SSE halves).
#if GRL_ISA_LEVEL >= 2
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

// ---------------------------------------------------------------------------------------
// GEMM 1 (the backward's): C (M x N, ldc) = alpha * A * B (+ C when accumulate), with
// A(r, k) = A[r * ars + k * acs] (so A may be a transposed view) and B row-major (K x N, ldb).
// Full tiles are GEMM 2's float tile (tile_fp: MR x NV vectors of kVecBytes, so 4 x 32 floats
// on AVX-512, 4 x 16 on AVX2), with the strides and alpha; the columns past the last whole
// vector: gemm_tile_edge. (The 16-wide ymm tiles before ran the stripe float32 backward
// 1.2-1.3x slower on AVX-512.)

// Edge tile (fewer than one vector of columns): plain loops, accumulating straight into C.
template <typename T>
static GRL_INLINE void gemm_tile_edge(int64_t mr, int64_t nr, int64_t K, T alpha, const T* A, int64_t ars,
                                      int64_t acs, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  for (int64_t r = 0; r < mr; ++r) {
    T acc[64] = {};
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[r * ars + k * acs];
      const T* b = B + k * ldb;
      for (int64_t jj = 0; jj < nr; ++jj) acc[jj] += a * b[jj];
    }
    T* c = C + r * ldc;
    for (int64_t jj = 0; jj < nr; ++jj) c[jj] = accumulate ? c[jj] + alpha * acc[jj] : alpha * acc[jj];
  }
}

// ---------------------------------------------------------------------------------------
// GEMM 2 (the forwards'): operand tiles in a "product type" T chosen per input dtype and ISA
// (OpType below): float32/float64 for float inputs, and raw bfloat16 bits for bfloat16
// inputs on AVX512-BF16 machines (elsewhere bfloat16 inputs run through float32 tiles).
//   A: row-major M x K, row stride lda, K contiguous (bf16: pairs (k, k+1) read as one int32);
//   B: "K-major": element (k, n) at bidx(k, n, ldb): float: k * ldb + n; bf16: the VNNI pair
//      layout ((k / 2) * ldb + n) * 2 + k % 2 that vdpbf16ps consumes (ldb, N multiples of 16);
//   C: float accumulators, row-major, C = A B (+ C when accumulate).
// K is padded to even for bf16 with zeros in both operands (callers zero-fill the pad).
template <typename T>
struct OpLayout {
  static constexpr int kstep = 1;
  static GRL_INLINE int64_t bidx(int64_t k, int64_t n, int64_t ldb) { return k * ldb + n; }
  static GRL_INLINE T from(float x) { return static_cast<T>(x); }
  static GRL_INLINE T from(double x) { return static_cast<T>(x); }
};

template <>
struct OpLayout<uint16_t> {
  static constexpr int kstep = 2;
  static GRL_INLINE int64_t bidx(int64_t k, int64_t n, int64_t ldb) { return ((k >> 1) * ldb + n) * 2 + (k & 1); }
  static GRL_INLINE uint16_t from(float x) { return float_to_bf16_bits(x); }
};

template <typename T>
static GRL_INLINE int64_t kpad(int64_t K) {
  return (K + OpLayout<T>::kstep - 1) / OpLayout<T>::kstep * OpLayout<T>::kstep;
}

// Product type of an input dtype: bf16 bits only where vdpbf16ps exists.
template <typename scalar_t, typename acc_t>
struct OpType {
  using T = acc_t;
};
#if GRL_ISA_LEVEL >= 2
template <>
struct OpType<c10::BFloat16, float> {
  using T = uint16_t;
};
#endif

// float / double tile: MR rows x NV vectors of kVecBytes, C = alpha A B (+ C), A(r, k) at
// A[r * ars + k * acs] (the forwards pass alpha 1, ars lda, acs 1: constants once inlined).
template <int MR, int NV, typename T>
static GRL_INLINE void tile_fp(int64_t K, T alpha, const T* __restrict A, int64_t ars, int64_t acs,
                               const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc, bool accumulate) {
  typedef T V __attribute__((vector_size(kVecBytes)));
  constexpr int L = kVecBytes / sizeof(T);
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], B + k * ldb + v * L, sizeof(V));
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * ars + k * acs];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      T* c = C + r * ldc + v * L;
      V out = alpha * acc[r][v];
      if (accumulate) {
        V old;
        std::memcpy(&old, c, sizeof(V));
        out += old;
      }
      std::memcpy(c, &out, sizeof(V));
    }
}

// GEMM 1's rows r0 .. r0 + MR: full tiles of 2 and 1 vectors, then the edge columns.
template <int MR, typename T>
static GRL_INLINE void gemm_rows(int64_t N, int64_t K, T alpha, const T* A, int64_t ars, int64_t acs, const T* B,
                                 int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int L = kVecBytes / sizeof(T);
  int64_t j = 0;
  for (; j + 2 * L <= N; j += 2 * L) tile_fp<MR, 2, T>(K, alpha, A, ars, acs, B + j, ldb, C + j, ldc, accumulate);
  for (; j + L <= N; j += L) tile_fp<MR, 1, T>(K, alpha, A, ars, acs, B + j, ldb, C + j, ldc, accumulate);
  if (j < N) gemm_tile_edge<T>(MR, N - j, K, alpha, A, ars, acs, B + j, ldb, C + j, ldc, accumulate);
}

template <typename T>
static void gemm(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t ars, int64_t acs, const T* B,
                 int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int MR = 4;
  int64_t i = 0;
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<T, float>::value)  // 8-row tiles, as gemm_op's
    for (; i + 2 * MR <= M; i += 2 * MR)
      gemm_rows<2 * MR, T>(N, K, alpha, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate);
#endif
  for (; i + MR <= M; i += MR) gemm_rows<MR, T>(N, K, alpha, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate);
  switch (M - i) {
    case 3: gemm_rows<3, T>(N, K, alpha, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 2: gemm_rows<2, T>(N, K, alpha, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 1: gemm_rows<1, T>(N, K, alpha, A + i * ars, ars, acs, B, ldb, C + i * ldc, ldc, accumulate); break;
    default: break;
  }
}

template <int MR, typename T>
static GRL_INLINE void row_tiles_fp(int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                                    int64_t ldc, bool accumulate) {
  constexpr int L = kVecBytes / sizeof(T);
  int64_t j = 0;
  for (; j + 2 * L <= N; j += 2 * L) tile_fp<MR, 2, T>(K, T(1), A, lda, 1, B + j, ldb, C + j, ldc, accumulate);
  for (; j < N; j += L) tile_fp<MR, 1, T>(K, T(1), A, lda, 1, B + j, ldb, C + j, ldc, accumulate);
}

#if GRL_ISA_LEVEL >= 2
// bfloat16 tile: MR rows x NV zmm of 16 float accumulators; per k pair one vdpbf16ps per
// accumulator (a broadcast pair of A times 16 pairs of B, summed into float32).
template <int MR, int NV>
static GRL_INLINE void tile_bf16(int64_t K2, const uint16_t* __restrict A, int64_t lda,
                                 const uint16_t* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc,
                                 bool accumulate) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K2; ++kk) {
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(B + (kk * ldb + 16 * v) * 2);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * kk, sizeof(pair));
      const __m512i av = _mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + 16 * v;
      __m512 out = acc[r][v];
      if (accumulate) out = _mm512_add_ps(out, _mm512_loadu_ps(c));
      _mm512_storeu_ps(c, out);
    }
}

template <int MR>
static GRL_INLINE void row_tiles_bf16(int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t K2 = (K + 1) / 2;
  int64_t j = 0;
  for (; j + 32 <= N; j += 32) tile_bf16<MR, 2>(K2, A, lda, B + 2 * j, ldb, C + j, ldc, accumulate);
  for (; j < N; j += 16) tile_bf16<MR, 1>(K2, A, lda, B + 2 * j, ldb, C + j, ldc, accumulate);
}
#endif

template <int MR, typename T, typename acc_t>
static GRL_INLINE void row_tiles(int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, acc_t* C,
                                 int64_t ldc, bool accumulate) {
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<T, uint16_t>::value) {
    row_tiles_bf16<MR>(N, K, A, lda, B, ldb, C, ldc, accumulate);
    return;
  } else
#endif
  {
    row_tiles_fp<MR, T>(N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
}

// Products of at least this many multiply-adds go to AMX on the "amx" path (GRL-T/S blocks:
// 32 x 64 x 16 to 64 x 32 x 32, i.e. <= 65536, stay on vdpbf16ps; window 32 / stripes 64 x 64
// at head dim 30: 0.5-1M, AMX). Measured, one thread, bf16 forwards at 256x256: window 32
// 392-402 -> 228-249 ms, stripes 64x64 236-252 -> 178-183 ms on AMX; GRL-T's window 8 and
// stripes 8 x 64 1.05-1.2x slower when their products went to AMX too.
constexpr int64_t kAmxMinMacs = int64_t(1) << 17;

// C (M x N) = A (M x K) B (K x N) (+ C); N a multiple of 16, B and C padded to it.
template <typename T, typename acc_t>
static void gemm_op(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, acc_t* C,
                    int64_t ldc, bool accumulate) {
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<T, uint16_t>::value) {
    if (amx_active() && M * N * K >= kAmxMinMacs) {
      // AMX tiles through oneDNN's brgemm (at::native::cpublas, torch's own micro-kernel): the
      // same row-major A and VNNI-pair B (its ld_b counts columns, as ldb here); K rounded up to
      // even over the zero pads. The dispatchers release the tile state after each thread's range.
      // Small products stay on vdpbf16ps: a brgemm call whose shape differs from the previous one
      // re-configures the tiles (~430 ns), more than a 32 x 64 x 16 product costs on vdpbf16ps.
      at::native::cpublas::brgemm(M, N, K + (K & 1), lda, ldb, ldc, accumulate,
                                  reinterpret_cast<const at::BFloat16*>(A), reinterpret_cast<const at::BFloat16*>(B),
                                  C, true);
      return;
    }
  }
#endif
  constexpr int MR = 4;
  int64_t i = 0;
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<T, float>::value)  // 8 x 32 tiles: 16 zmm accumulators hide the FMA latency
    for (; i + 2 * MR <= M; i += 2 * MR)
      row_tiles<2 * MR, T, acc_t>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
#endif
  for (; i + MR <= M; i += MR) row_tiles<MR, T, acc_t>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  switch (M - i) {
    case 3: row_tiles<3, T, acc_t>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 2: row_tiles<2, T, acc_t>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 1: row_tiles<1, T, acc_t>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate); break;
    default: break;
  }
}

// One run of logits in place: o[x] = s cs[x] o[x] + bb[x] (cs == nullptr: s o[x] + bb[x]),
// the scaled dot products plus a contiguous run of a bias table.
template <typename acc_t>
static GRL_INLINE void bias_run(acc_t* __restrict o, const acc_t* __restrict cs, const acc_t* __restrict bb, acc_t s,
                                int64_t len) {
  if (cs) {
    for (int64_t x = 0; x < len; ++x) o[x] = s * cs[x] * o[x] + bb[x];
  } else {
    for (int64_t x = 0; x < len; ++x) o[x] = s * o[x] + bb[x];
  }
}

// row[j] += mask where ids[j] != id (the -100 of keys in another region of the shifted image)
template <typename acc_t>
static GRL_INLINE void add_region_mask(acc_t* __restrict row, const int* __restrict ids, int id, int64_t n) {
  for (int64_t j = 0; j < n; ++j) row[j] += (id != ids[j]) ? acc_t(kMaskValue) : acc_t(0);
}

#if GRL_ISA_LEVEL >= 2
// The same on 16 lanes (GCC compiles the loops above to 8-wide halves, whose stores do not
// forward to the softmax's 16-wide loads of the row: ~6 % of a stripe forward). Runs whose
// length is a multiple of 16 (GRL-T/S: 64 tokens, 16 anchors) store whole vectors only.
// Short runs (window 8's rows, the 8-token rows and 2-anchor rows of vertical stripes) are
// better served by bias_gather below.
static GRL_INLINE void bias_run(float* o, const float* cs, const float* bb, float s, int64_t len) {
  if (len % 16) {
    bias_run<float>(o, cs, bb, s, len);
    return;
  }
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t x = 0; x < len; x += 16) {
    const __m512 sc = cs ? _mm512_mul_ps(sv, _mm512_loadu_ps(cs + x)) : sv;
    _mm512_storeu_ps(o + x, _mm512_fmadd_ps(sc, _mm512_loadu_ps(o + x), _mm512_loadu_ps(bb + x)));
  }
}

// A whole row of logits with the bias gathered: row[j] = s cs[j] row[j] + base[idx[j]], j < n
// (cs == nullptr: s row[j] + ...), 16 lanes, whole-vector stores but for the tail.
static GRL_INLINE void bias_gather(float* row, const float* cs, const float* base, const int32_t* idx, float s,
                                   int64_t n) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask16(n - j);
    const __m512i ix = _mm512_maskz_loadu_epi32(k, idx + j);
    const __m512 b = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, ix, base, 4);
    const __m512 sc = cs ? _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(k, cs + j)) : sv;
    const __m512 v = _mm512_fmadd_ps(sc, _mm512_maskz_loadu_ps(k, row + j), b);
    if (k == 0xffff) {
      _mm512_storeu_ps(row + j, v);
    } else {
      _mm512_mask_storeu_ps(row + j, k, v);
    }
  }
}

static GRL_INLINE void add_region_mask(float* row, const int* ids, int id, int64_t n) {
  const __m512i iv = _mm512_set1_epi32(id);
  const __m512 mv = _mm512_set1_ps(kMaskValue);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask16(n - j);
    const __mmask16 other = _mm512_mask_cmpneq_epi32_mask(k, _mm512_maskz_loadu_epi32(k, ids + j), iv);
    if (k == 0xffff) {
      const __m512 x = _mm512_loadu_ps(row + j);
      _mm512_storeu_ps(row + j, _mm512_mask_add_ps(x, other, x, mv));
    } else {
      const __m512 x = _mm512_maskz_loadu_ps(k, row + j);
      _mm512_mask_storeu_ps(row + j, k, _mm512_mask_add_ps(x, other, x, mv));
    }
  }
}
#endif

#if GRL_ISA_LEVEL >= 2
// ---- bfloat16 rows straight into the bf16 product tiles (no float round trip)

// dst[j * ldd + c] = src row j (base + pos[j] * sl, channel stride 1), c < d, raw bits; with
// ss, ss[j] = its float32 sum of squares in inv_norm's lane order (one 16-lane FMA chain,
// then the tree reduce). Rows are prefetched kPrefetch ahead (scattered over the image).
static GRL_INLINE void gather_bf16_rows(const uint16_t* base, const int64_t* pos, int64_t n, int64_t sl, int64_t d,
                                        uint16_t* __restrict dst, int64_t ldd, float* __restrict ss) {
  SumSqRows<float> sums(ss);
  for (int64_t j = 0; j < std::min(kPrefetch, n); ++j) prefetch_row(base + pos[j] * sl, d, 1);
  for (int64_t j = 0; j < n; ++j) {
    if (j + kPrefetch < n) prefetch_row(base + pos[j + kPrefetch] * sl, d, 1);
    const uint16_t* src = base + pos[j] * sl;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
      const __mmask16 m = tail_mask16(d - c);
      const __m256i raw = _mm256_maskz_loadu_epi16(m, src + c);
      _mm256_mask_storeu_epi16(dst + j * ldd + c, m, raw);
      const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      acc = _mm512_fmadd_ps(f, f, acc);
    }
    if (ss) sums.push(acc);
  }
  if (ss) sums.finish();
}

// x[j] = 1 / max(sqrt(x[j]), eps) for j < n (sums of squares in, inv_norm's value out)
static GRL_INLINE void inv_norms_from_sumsq(float* x, int64_t n) {
  const __m512 eps = _mm512_set1_ps(static_cast<float>(kNormEps)), one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask16(n - j);
    const __m512 r = _mm512_sqrt_ps(_mm512_maskz_loadu_ps(m, x + j));
    // NaN compares false: eps, as inv_norm's (r > eps ? r : eps)
    _mm512_mask_storeu_ps(x + j, m, _mm512_div_ps(one, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(r, eps, _CMP_GT_OQ), eps, r)));
  }
}

// The B operand "rows^T" (K = channels, N = tokens) of n token rows (ld ldr, K pairs of
// channels as 32-bit elements, dk / 2 of them): B[((c / 2) ldb + j) 2 + c % 2] = rows[j ldr + c],
// a 32-bit transpose by 16-lane gathers from the (L1-resident) rows.
static GRL_INLINE void bf16_rows_to_kn_pairs(const uint16_t* rows, int64_t n, int64_t ldr, int64_t dk, uint16_t* B,
                                             int64_t ldb) {
  const int32_t* r32 = reinterpret_cast<const int32_t*>(rows);
  int32_t* b32 = reinterpret_cast<int32_t*>(B);
  const int64_t pairs = dk / 2, ld32 = ldr / 2;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask16(n - j);
    __m512i idx = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j))),
                                     _mm512_set1_epi32(static_cast<int>(ld32)));
    for (int64_t p = 0; p < pairs; ++p, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(1)))
      _mm512_mask_storeu_epi32(b32 + p * ldb + j, m, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, r32, 4));
  }
}

// The B operand "rows" (K = tokens, N = channels) of n token rows (ld ldr, d channels): pairs
// of rows interleaved, B[((j / 2) ldb + c) 2 + j % 2] = rows[j ldr + c], for c < pad16(d) <= ldb
// (rows' entries d .. pad16(d) - 1 must be zero: they fill B's pad columns); an odd last row
// pairs with zeros.
static GRL_INLINE void bf16_rows_to_nk_pairs(const uint16_t* rows, int64_t n, int64_t ldr, int64_t d, uint16_t* B,
                                             int64_t ldb) {
  alignas(64) static const uint16_t kPairIdx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx = _mm512_load_si512(kPairIdx);
  for (int64_t j = 0; j < n; j += 2) {
    const uint16_t* a = rows + j * ldr;
    for (int64_t c = 0; c < d; c += 16) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c));
      const __m256i y = j + 1 < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + ldr + c)) : _mm256_setzero_si256();
      _mm512_storeu_si512(B + ((j >> 1) * ldb + c) * 2,
                          _mm512_permutex2var_epi16(_mm512_castsi256_si512(x), idx, _mm512_castsi256_si512(y)));
    }
  }
}
#endif

// inv_norm for n rows at once from their sums of squares (row_dot(x, x, d), in x): the square
// roots and divisions run over 16 rows a vector instead of one latency chain per row (the
// same correctly rounded operations, so the same bits as inv_norm).
template <typename acc_t>
static GRL_INLINE void inv_norms_of_sumsq(acc_t* x, int64_t n) {
#if GRL_ISA_LEVEL >= 2
  if constexpr (std::is_same<acc_t, float>::value) {
    inv_norms_from_sumsq(x, n);
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    const acc_t r = std::sqrt(x[j]);
    x[j] = acc_t(1) / (r > acc_t(kNormEps) ? r : acc_t(kNormEps));
  }
}

#if GRL_ISA_LEVEL >= 2
// Logits and exact softmax of R rows at once, each of 16 NV keys held in NV registers: row r's
// logits x = s[r] colscale dots_r + bias(r, v) (+ the -100 mask where key_ids != row_ids[r]),
// then softmax_to's steps: the same operations in the same order as the separate logit
// functions (bias_run, bias_gather, window_logits_row) and softmax_to, so the same sums, without
// storing the logits and loading them back twice, and R rows' independent dependency chains (two
// tree reductions, the exp polynomial, a division per row) interleaved. Probabilities to
// out + r ldo, float32 or bf16 (vcvtneps2bf16: round to nearest even; below 2^-126 they go to 0).
// One vector of logits: sc dots + bias (+ the -100 mask on the lanes whose key_ids != ri), as
// bias_run / bias_gather then add_region_mask compute them in memory (the same FMA, the same add).
static GRL_INLINE __m512 logit16(__m512 sc, __m512 dots, __m512 bias, const int* key_ids, __m512i ri, bool masked) {
  __m512 x = _mm512_fmadd_ps(sc, dots, bias);
  if (masked) {
    const __mmask16 other = _mm512_cmpneq_epi32_mask(_mm512_loadu_si512(key_ids), ri);
    x = _mm512_mask_add_ps(x, other, x, _mm512_set1_ps(kMaskValue));
  }
  return x;
}

// R rows of 16 NV logits into registers, x[r][v] = logit16(s[r] colscale, dots_r, bias(r, v)), and
// each row's lane maxima mx[r] (row_max's order: a NaN x keeps the max).
template <int NV, int R, typename Bias>
static GRL_INLINE void logit_rows_regs(const Bias& bias, const float* dots, int64_t ld, const int* key_ids,
                                       const int* row_ids, bool masked, const float* s, const float* colscale,
                                       __m512 (&x)[R][NV], __m512 (&mx)[R]) {
  __m512 cs[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) cs[v] = _mm512_loadu_ps(colscale + 16 * v);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 sv = _mm512_set1_ps(s[r]);
    const __m512i ri = _mm512_set1_epi32(row_ids[r]);
    mx[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      x[r][v] = logit16(_mm512_mul_ps(sv, cs[v]), _mm512_loadu_ps(dots + r * ld + 16 * v), bias(r, v), key_ids + 16 * v,
                        ri, masked);
      mx[r] = _mm512_max_ps(x[r][v], mx[r]);
    }
  }
}

template <int NV, int R, typename U, typename Bias>
static GRL_INLINE void softmax_rows_regs(const Bias& bias, const float* dots, int64_t ld, const int* key_ids,
                                         const int* row_ids, bool masked, const float* s, const float* colscale, U* out,
                                         int64_t ldo) {
  __m512 x[R][NV], mx[R], sum[R];
  logit_rows_regs<NV, R>(bias, dots, ld, key_ids, row_ids, masked, s, colscale, x, mx);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]));
    sum[r] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      x[r][v] = exp_fast16(_mm512_sub_ps(x[r][v], m));
      sum[r] = _mm512_add_ps(sum[r], x[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum[r]));
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 p = _mm512_mul_ps(x[r][v], inv);
      if constexpr (std::is_same<U, float>::value) {
        _mm512_storeu_ps(out + r * ldo + 16 * v, p);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + 16 * v), (__m256i)_mm512_cvtneps_pbh(p));
      }
    }
  }
}

// mb rows through softmax_rows_regs, R at a time (more rows in flight for shorter rows).
template <int NV, typename U, typename Bias>
static GRL_INLINE void softmax_block_regs(const Bias& bias, const float* dots, int64_t ld, int64_t mb,
                                          const int* key_ids, const int* row_ids, bool masked, const float* s,
                                          const float* colscale, U* out, int64_t ldo) {
  constexpr int R = NV <= 2 ? 4 : 2;
  int64_t r = 0;
  for (; r + R <= mb; r += R) {
    auto b = [&bias, r](int64_t rr, int v) { return bias(r + rr, v); };
    softmax_rows_regs<NV, R>(b, dots + r * ld, ld, key_ids, row_ids + r, masked, s + r, colscale, out + r * ldo, ldo);
  }
  for (; r < mb; ++r) {
    auto b = [&bias, r](int64_t rr, int v) { return bias(r + rr, v); };
    softmax_rows_regs<NV, 1>(b, dots + r * ld, ld, key_ids, row_ids + r, masked, s + r, colscale, out + r * ldo, ldo);
  }
}

// softmax_block_regs for rows of nv = 1..4 vectors (16..64 entries), chosen at run time.
template <typename U, typename Bias>
static GRL_INLINE void softmax_block_regs_nv(int nv, const Bias& bias, const float* dots, int64_t ld, int64_t mb,
                                             const int* key_ids, const int* row_ids, bool masked, const float* s,
                                             const float* colscale, U* out, int64_t ldo) {
  switch (nv) {
    case 1: return softmax_block_regs<1>(bias, dots, ld, mb, key_ids, row_ids, masked, s, colscale, out, ldo);
    case 2: return softmax_block_regs<2>(bias, dots, ld, mb, key_ids, row_ids, masked, s, colscale, out, ldo);
    case 3: return softmax_block_regs<3>(bias, dots, ld, mb, key_ids, row_ids, masked, s, colscale, out, ldo);
    default: return softmax_block_regs<4>(bias, dots, ld, mb, key_ids, row_ids, masked, s, colscale, out, ldo);
  }
}
// One online-softmax step of R rows over a block of 16 NV keys, in registers (stage 1 of the
// stripes: anchor rows over a token block): x = s[r] colscale dots_r + bias(r, v) (+ mask), then
// stripe_forward_task's steps on it: mx = max(m_r, row max), corr_r = exp(m_r - mx), exp(x - mx)
// to out_r (may alias dots_r), l_r = l_r corr_r + sum, m_r = mx. The same operations in the same
// order as stage1_logits, row_max and exp_shift_sum (the backward recomputes these logits through
// stage1_logits and needs them bit for bit), without the row's three trips through memory.
template <int NV, int R, typename Bias>
static GRL_INLINE void online_rows_regs(const Bias& bias, const float* dots, int64_t ld, const int* key_ids,
                                        const int* row_ids, bool masked, const float* s, const float* colscale,
                                        float* out, int64_t ldo, float* m, float* l, float* corr) {
  __m512 x[R][NV], mv[R], sum[R];
  logit_rows_regs<NV, R>(bias, dots, ld, key_ids, row_ids, masked, s, colscale, x, mv);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float bm = _mm512_reduce_max_ps(mv[r]);
    const float mx = bm > m[r] ? bm : m[r];
    corr[r] = exp_fast(m[r] - mx);  // 0 on the first block (m = -inf)
    m[r] = mx;
    const __m512 mm = _mm512_set1_ps(mx);
    sum[r] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      x[r][v] = exp_fast16(_mm512_sub_ps(x[r][v], mm));
      _mm512_storeu_ps(out + r * ldo + 16 * v, x[r][v]);
      sum[r] = _mm512_add_ps(sum[r], x[r][v]);
    }
  }
#pragma GCC unroll 4
  // stripe_forward_task's l * corr + sum, which GCC contracts to this FMA
  for (int r = 0; r < R; ++r) l[r] = std::fma(l[r], corr[r], _mm512_reduce_add_ps(sum[r]));
}

// mb rows through online_rows_regs, R at a time; nv = 1..4 vectors (16..64 keys), chosen at run time.
template <int NV, typename Bias>
static GRL_INLINE void online_block_regs(const Bias& bias, const float* dots, int64_t ld, int64_t mb,
                                         const int* key_ids, const int* row_ids, bool masked, const float* s,
                                         const float* colscale, float* out, int64_t ldo, float* m, float* l,
                                         float* corr) {
  constexpr int R = NV <= 2 ? 4 : 2;
  int64_t r = 0;
  for (; r + R <= mb; r += R) {
    auto b = [&bias, r](int64_t rr, int v) { return bias(r + rr, v); };
    online_rows_regs<NV, R>(b, dots + r * ld, ld, key_ids, row_ids + r, masked, s + r, colscale, out + r * ldo, ldo,
                            m + r, l + r, corr + r);
  }
  for (; r < mb; ++r) {
    auto b = [&bias, r](int64_t rr, int v) { return bias(r + rr, v); };
    online_rows_regs<NV, 1>(b, dots + r * ld, ld, key_ids, row_ids + r, masked, s + r, colscale, out + r * ldo, ldo,
                            m + r, l + r, corr + r);
  }
}

template <typename Bias>
static GRL_INLINE void online_block_regs_nv(int nv, const Bias& bias, const float* dots, int64_t ld, int64_t mb,
                                            const int* key_ids, const int* row_ids, bool masked, const float* s,
                                            const float* colscale, float* out, int64_t ldo, float* m, float* l,
                                            float* corr) {
  switch (nv) {
    case 1: return online_block_regs<1>(bias, dots, ld, mb, key_ids, row_ids, masked, s, colscale, out, ldo, m, l, corr);
    case 2: return online_block_regs<2>(bias, dots, ld, mb, key_ids, row_ids, masked, s, colscale, out, ldo, m, l, corr);
    case 3: return online_block_regs<3>(bias, dots, ld, mb, key_ids, row_ids, masked, s, colscale, out, ldo, m, l, corr);
    default: return online_block_regs<4>(bias, dots, ld, mb, key_ids, row_ids, masked, s, colscale, out, ldo, m, l, corr);
  }
}
#endif

// A contiguous run of bias-table entries: `len` consecutive logits starting at column `j0`
// of a row read bias[off + 0 .. off + len - 1] of a REVERSED table (see grl_cpu_common.h).
struct BiasRun {
  int64_t j0, len, off;
};

}  // namespace GRL_ISA
}  // namespace cpu
}  // namespace grl
