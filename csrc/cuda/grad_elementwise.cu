// The backward's element-wise grad_input kernels, one instantiation per input dtype and fused
// activation; backward.cu launches them through run_grad_elementwise.
#include "kernels.cuh"

namespace ckbn {
namespace gpu {

template <typename scalar_t, math::Activation act>
void run_grad_elementwise(const BackwardElementwise<scalar_t, acc_type<scalar_t>, act>& op,
                          const LaunchPlan& p) {
  run_elementwise(op, p);
}

#define CKBN_INSTANTIATE(scalar_t, act)         \
  template void run_grad_elementwise<scalar_t, act>( \
      const BackwardElementwise<scalar_t, acc_type<scalar_t>, act>&, const LaunchPlan&);
CKBN_FOR_EACH_DTYPE_AND_ACTIVATION(CKBN_INSTANTIATE)
#undef CKBN_INSTANTIATE

}  // namespace gpu
}  // namespace ckbn
