// ckbn::batch_stats on CUDA: per-channel mean and invstd by a Welford reduction.
#include "launch.cuh"

#include <torch/library.h>

namespace ckbn {
namespace gpu {
namespace {

std::tuple<at::Tensor, at::Tensor> batch_stats_cuda(const at::Tensor& input, double eps) {
  constexpr const char* op = "ckbn::batch_stats";
  check_batch_stats_args(input, eps);
  const KernelInput kin(input, op);
  const at::Tensor& view = kin.view;
  const Geometry& g = kin.geometry;
  const auto options = input.options().dtype(stats_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({g.channels}, options);
  at::Tensor invstd = at::empty({g.channels}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "ckbn_batch_stats", [&] {
        using acc_t = acc_type<scalar_t>;
        if (view.numel() == 0) {
          mean.zero_();
          invstd.fill_(math::invstd_from_var<acc_t>(acc_t(0), static_cast<acc_t>(eps)));
          return;
        }
        using Red = StatsReduction<scalar_t, acc_t>;
        const Red red{view.const_data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
                      invstd.data_ptr<acc_t>(), static_cast<acc_t>(eps)};
        run_reduction(red, plan_reduction<Red>(g, {red.x}, view), g, view);
      });
  return {mean, invstd};
}

}  // namespace
}  // namespace gpu
}  // namespace ckbn

TORCH_LIBRARY_IMPL(ckbn, CUDA, m) { m.impl("batch_stats", &ckbn::gpu::batch_stats_cuda); }
