// The backward's reduction kernels (sum(dy), sum(dy * (x - mean)), and the fused grad_input), one
// instantiation per input dtype and fused activation; backward.cu launches them through
// run_grad_reduction.
#include "kernels.cuh"

namespace ckbn {
namespace gpu {

template <typename scalar_t, math::Activation act>
void run_grad_reduction(const GradReduction<scalar_t, acc_type<scalar_t>, act>& red,
                        const LaunchPlan& p, const at::Tensor& like) {
  run_reduction(red, p, like);
}

#define CKBN_INSTANTIATE(scalar_t, act)                                                      \
  template void run_grad_reduction<scalar_t, act>(                                          \
      const GradReduction<scalar_t, acc_type<scalar_t>, act>&, const LaunchPlan&, const at::Tensor&);
CKBN_FOR_EACH_DTYPE_AND_ACTIVATION(CKBN_INSTANTIATE)
#undef CKBN_INSTANTIATE

}  // namespace gpu
}  // namespace ckbn
