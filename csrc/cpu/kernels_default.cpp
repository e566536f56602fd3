// The CPU loops for any CPU: at::vec::Vectorized's generic implementation.
#define CPU_CAPABILITY DEFAULT
#include "cpu/loops.h"

namespace ckbn {
namespace cpu {

const Kernels& kernels_default() {
  return kKernels;
}

}  // namespace cpu
}  // namespace ckbn
