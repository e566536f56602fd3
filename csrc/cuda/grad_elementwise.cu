// The backward's element-wise grad_input kernels, one instantiation per input dtype; backward.cu
// plans and launches them through these functions.
#include "kernels.cuh"

namespace ckbn {
namespace gpu {

template <typename scalar_t>
plan::Plan plan_grad_elementwise(const Geometry& g, std::initializer_list<const void*> pointers,
                                 const at::Tensor& on) {
  return plan_elementwise<BackwardElementwise<scalar_t, acc_type<scalar_t>>>(g, pointers, on);
}

template <typename scalar_t>
void run_grad_elementwise(const BackwardElementwise<scalar_t, acc_type<scalar_t>>& op,
                          const plan::Plan& p, const Geometry& g) {
  run_elementwise(op, p, g);
}

#define CKBN_INSTANTIATE(scalar_t)                                                          \
  template plan::Plan plan_grad_elementwise<scalar_t>(                                      \
      const Geometry&, std::initializer_list<const void*>, const at::Tensor&);              \
  template void run_grad_elementwise<scalar_t>(                                             \
      const BackwardElementwise<scalar_t, acc_type<scalar_t>>&, const plan::Plan&, const Geometry&);

CKBN_INSTANTIATE(double)
CKBN_INSTANTIATE(float)
CKBN_INSTANTIATE(at::Half)
CKBN_INSTANTIATE(at::BFloat16)
#undef CKBN_INSTANTIATE

}  // namespace gpu
}  // namespace ckbn
