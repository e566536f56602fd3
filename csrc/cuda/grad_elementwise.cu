// The backward's element-wise grad_input kernels, one instantiation per input dtype; backward.cu
// launches them through run_grad_elementwise.
#include "kernels.cuh"

namespace ckbn {
namespace gpu {

template <typename scalar_t>
void run_grad_elementwise(const BackwardElementwise<scalar_t, acc_type<scalar_t>>& op,
                          const LaunchPlan& p) {
  run_elementwise(op, p);
}

template void run_grad_elementwise<double>(
    const BackwardElementwise<double, acc_type<double>>&, const LaunchPlan&);
template void run_grad_elementwise<float>(
    const BackwardElementwise<float, acc_type<float>>&, const LaunchPlan&);
template void run_grad_elementwise<at::Half>(
    const BackwardElementwise<at::Half, acc_type<at::Half>>&, const LaunchPlan&);
template void run_grad_elementwise<at::BFloat16>(
    const BackwardElementwise<at::BFloat16, acc_type<at::BFloat16>>&, const LaunchPlan&);

}  // namespace gpu
}  // namespace ckbn
