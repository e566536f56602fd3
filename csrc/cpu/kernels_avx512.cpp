// The CPU loops for AVX-512 CPUs, with the instruction sets ATen's own AVX512 kernels assume.
#include "cpu/kernels.h"

#ifdef CKBN_CPU_X86_DISPATCH
#define CKBN_KERNELS kernels_avx512
#define CKBN_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/loops.h"
#endif
