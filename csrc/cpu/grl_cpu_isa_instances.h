// Instantiates the task code of one kernel file once per instruction set. Include it with
// GRL_ISA_IMPL naming that file's *_impl.h; each copy lands in its own namespace (GRL_ISA:
// isa_base / isa_avx2 / isa_avx512), compiled with its own target flags (grl_cpu_common.h), and
// the dispatchers pick one at run time by CPU features. No include guard: used once per kernel.
#ifndef GRL_ISA_IMPL
#error "define GRL_ISA_IMPL (the *_impl.h to instantiate) before including grl_cpu_isa_instances.h"
#endif
#define GRL_ISA isa_base
#define GRL_ISA_LEVEL 0
#include GRL_ISA_IMPL
#undef GRL_ISA
#undef GRL_ISA_LEVEL
#if GRL_X86
GRL_ISA_BEGIN_AVX2
#define GRL_ISA isa_avx2
#define GRL_ISA_LEVEL 1
#include GRL_ISA_IMPL
#undef GRL_ISA
#undef GRL_ISA_LEVEL
GRL_ISA_END
GRL_ISA_BEGIN_AVX512
#define GRL_ISA isa_avx512
#define GRL_ISA_LEVEL 2
#include GRL_ISA_IMPL
#undef GRL_ISA
#undef GRL_ISA_LEVEL
GRL_ISA_END
#endif
#undef GRL_ISA_IMPL
