// The backward's reduction kernels (sum(dy), sum(dy * (x - mean)), and the fused grad_input), one
// instantiation per input dtype, fused activation, and fused grad_input or not; backward.cu plans
// and launches them through these functions.
#include "launch.cuh"

namespace ckbn {
namespace gpu {

template <typename scalar_t, math::Activation act, bool fuse_input>
plan::Plan plan_grad_reduction(const Geometry& g, std::initializer_list<const void*> pointers,
                               const at::Tensor& on, int64_t max_splits) {
  return plan_reduction<GradReduction<scalar_t, acc_type<scalar_t>, act, fuse_input>>(
      g, pointers, on, max_splits);
}

template <typename scalar_t, math::Activation act, bool fuse_input>
void run_grad_reduction(const GradReduction<scalar_t, acc_type<scalar_t>, act, fuse_input>& red,
                        const plan::Plan& p, const Geometry& g, const at::Tensor& like) {
  run_reduction(red, p, g, like);
}

#define CKBN_INSTANTIATE_FUSED(scalar_t, act, fuse_input)                                     \
  template plan::Plan plan_grad_reduction<scalar_t, act, fuse_input>(                         \
      const Geometry&, std::initializer_list<const void*>, const at::Tensor&, int64_t);       \
  template void run_grad_reduction<scalar_t, act, fuse_input>(                                \
      const GradReduction<scalar_t, acc_type<scalar_t>, act, fuse_input>&, const plan::Plan&, \
      const Geometry&, const at::Tensor&);
#define CKBN_INSTANTIATE(scalar_t, act)        \
  CKBN_INSTANTIATE_FUSED(scalar_t, act, false) \
  CKBN_INSTANTIATE_FUSED(scalar_t, act, true)
CKBN_FOR_EACH_DTYPE_AND_ACTIVATION(CKBN_INSTANTIATE)
#undef CKBN_INSTANTIATE
#undef CKBN_INSTANTIATE_FUSED

}  // namespace gpu
}  // namespace ckbn
