// The backward's element-wise grad_input kernels, one instantiation per input dtype and fused
// activation; backward.cu plans and launches them through these functions.
#include "launch.cuh"

namespace ckbn {
namespace gpu {

template <typename scalar_t, math::Activation act>
plan::Plan plan_grad_elementwise(const Geometry& g, std::initializer_list<const void*> pointers,
                                 const at::Tensor& on, bool flat) {
  return plan_elementwise<BackwardElementwise<scalar_t, acc_type<scalar_t>, act>>(g, pointers, on,
                                                                                  flat);
}

template <typename scalar_t, math::Activation act>
void run_grad_elementwise(const BackwardElementwise<scalar_t, acc_type<scalar_t>, act>& op,
                          const plan::Plan& p, const Geometry& g) {
  run_elementwise(op, p, g);
}

#define CKBN_INSTANTIATE(scalar_t, act)                                                 \
  template plan::Plan plan_grad_elementwise<scalar_t, act>(                             \
      const Geometry&, std::initializer_list<const void*>, const at::Tensor&, bool);    \
  template void run_grad_elementwise<scalar_t, act>(                                    \
      const BackwardElementwise<scalar_t, acc_type<scalar_t>, act>&, const plan::Plan&, \
      const Geometry&);
CKBN_FOR_EACH_DTYPE_AND_ACTIVATION(CKBN_INSTANTIATE)
#undef CKBN_INSTANTIATE

}  // namespace gpu
}  // namespace ckbn
