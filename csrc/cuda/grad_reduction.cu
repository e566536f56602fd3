// The backward's reduction kernels (sum(dy), sum(dy * (x - mean)), and the fused grad_input), one
// instantiation per input dtype; backward.cu launches them through run_grad_reduction.
#include "kernels.cuh"

namespace ckbn {
namespace gpu {

template <typename scalar_t>
void run_grad_reduction(const GradReduction<scalar_t, acc_type<scalar_t>>& red, const LaunchPlan& p,
                        const at::Tensor& like) {
  run_reduction(red, p, like);
}

template void run_grad_reduction<double>(const GradReduction<double, acc_type<double>>&,
                                        const LaunchPlan&, const at::Tensor&);
template void run_grad_reduction<float>(const GradReduction<float, acc_type<float>>&,
                                        const LaunchPlan&, const at::Tensor&);
template void run_grad_reduction<at::Half>(const GradReduction<at::Half, acc_type<at::Half>>&,
                                        const LaunchPlan&, const at::Tensor&);
template void run_grad_reduction<at::BFloat16>(const GradReduction<at::BFloat16, acc_type<at::BFloat16>>&,
                                        const LaunchPlan&, const at::Tensor&);

}  // namespace gpu
}  // namespace ckbn
