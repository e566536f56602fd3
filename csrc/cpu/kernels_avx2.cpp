// The CPU loops for AVX2 CPUs, with the instruction sets ATen's own AVX2 kernels assume.
#include "cpu/kernels.h"

#ifdef CKBN_CPU_X86_DISPATCH
#define CKBN_KERNELS kernels_avx2
#define CKBN_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/loops.h"
#endif
