// ckbn::normalize on CUDA: y = (x - mean) * invstd * weight + bias, element-wise.
#include "launch.cuh"

#include <torch/library.h>

namespace ckbn {
namespace gpu {
namespace {

at::Tensor normalize_cuda(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                          const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, c10::string_view activation,
                          double activation_param) {
  constexpr const char* op = "ckbn::normalize";
  check_normalize_args(input, mean, invstd, weight, bias);
  const math::Activation fused = parse_activation(activation, activation_param, op);
  const KernelInput kin(input, op);
  const at::Tensor& view = kin.view;
  const Geometry& g = kin.geometry;
  at::Tensor out = at::empty_like(view);
  if (view.numel() == 0) {
    return in_output_format(out, input);
  }
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor invstd_c = invstd.contiguous();
  const auto weight_c = contiguous_if_defined(weight);
  const auto bias_c = contiguous_if_defined(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "ckbn_normalize", [&] {
        using acc_t = acc_type<scalar_t>;
        math::visit_activation(fused, [&](auto act) {
          using Op = NormalizeElementwise<scalar_t, acc_t, decltype(act)::value>;
          const Op element{view.const_data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(),
                           mean_c.const_data_ptr<acc_t>(),
                           invstd_c.const_data_ptr<acc_t>(),
                           channel_param<scalar_t, acc_t>(weight_c, 1.0),
                           channel_param<scalar_t, acc_t>(bias_c, 0.0),
                           static_cast<acc_t>(activation_param)};
          run_elementwise(element, plan_elementwise<Op>(g, {element.x, element.out}, view), g);
        });
      });
  return in_output_format(out, input);
}

}  // namespace
}  // namespace gpu
}  // namespace ckbn

TORCH_LIBRARY_IMPL(ckbn, CUDA, m) { m.impl("normalize", &ckbn::gpu::normalize_cuda); }
