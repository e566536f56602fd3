// The CPU loops for any CPU: at::vec::Vectorized's generic implementation.
#define CKBN_KERNELS kernels_default
#define CPU_CAPABILITY DEFAULT
#include "cpu/loops.h"
