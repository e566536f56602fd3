// The backward operators on CUDA: backward (fused or in two passes), backward_reduce and
// backward_elemt. Their kernels are instantiated in grad_reduction.cu and grad_elementwise.cu.
#include "launch.cuh"

#include <torch/library.h>

namespace ckbn {
namespace gpu {
namespace {

// Shared by backward and backward_elemt: grad_input of `view` (dy already in view's strides)
// through `element`, whose output pointer is filled in here.
template <typename scalar_t, math::Activation act>
void run_grad_input(BackwardElementwise<scalar_t, acc_type<scalar_t>, act> element,
                    const at::Tensor& grad_input, const Geometry& g, const at::Tensor& view) {
  element.out = grad_input.data_ptr<scalar_t>();
  run_grad_elementwise(
      element, plan_grad_elementwise<scalar_t, act>(g, {element.x, element.dy, element.out}, view),
      g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const c10::optional<at::Tensor>& weight, bool train,
    std::array<bool, 3> output_mask, const c10::optional<at::Tensor>& bias,
    c10::string_view activation, double activation_param) {
  constexpr const char* op = "ckbn::backward";
  check_backward_args(grad_output, input, mean, invstd, weight);
  const math::Activation fused_activation =
      check_backward_activation_args(bias, input, activation, activation_param);
  const KernelInput kin(input, op);
  const at::Tensor& view = kin.view;
  const Geometry& g = kin.geometry;
  const bool need_input = output_mask[0];
  const bool need_weight = output_mask[1];
  const bool need_bias = output_mask[2];
  const at::Tensor dy = match_strides(grad_output, view);
  const auto weight_c = contiguous_if_defined(weight);
  const auto bias_c = contiguous_if_defined(bias);
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor invstd_c = invstd.contiguous();
  const auto param_options =
      mean.options().dtype(weight_c.has_value() ? weight_c->scalar_type() : mean.scalar_type());
  at::Tensor grad_input = need_input ? at::empty_like(view) : input.new_empty({0});
  at::Tensor grad_weight = at::empty({need_weight ? g.channels : 0}, param_options);
  at::Tensor grad_bias = at::empty({need_bias ? g.channels : 0}, param_options);
  // grad_input needs the batch sums only in training; grad_weight and grad_bias are sums.
  const bool needs_reduction = (train && need_input) || need_weight || need_bias;

  if (view.numel() == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
  } else if (needs_reduction || need_input) {  // else grad_input is empty: nothing to launch
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "ckbn_backward", [&] {
          math::visit_activation(fused_activation, [&](auto act) {
            using acc_t = acc_type<scalar_t>;
            constexpr math::Activation kAct = decltype(act)::value;
            BackwardElementwise<scalar_t, acc_t, kAct> element{
                view.const_data_ptr<scalar_t>(),
                dy.const_data_ptr<scalar_t>(),
                nullptr,
                mean_c.const_data_ptr<acc_t>(),
                invstd_c.const_data_ptr<acc_t>(),
                channel_param<scalar_t, acc_t>(weight_c, 1.0),
                nullptr,
                nullptr,
                acc_t(1) / static_cast<acc_t>(g.per_channel()),
                train,
                channel_param<scalar_t, acc_t>(bias_c, 0.0),
                static_cast<acc_t>(activation_param)};
            if (!needs_reduction) {
              run_grad_input(element, grad_input, g, view);
              return;
            }
            const std::initializer_list<const void*> pointers{
                element.x, element.dy, need_input ? grad_input.data_ptr() : nullptr};
            const plan::Plan split_plan =
                plan_grad_reduction<scalar_t, kAct, false>(g, pointers, view);
            plan::Plan fused_plan;
            bool fused = false;
            if (need_input) {
              // A unit holding a whole channel can write its grad_input in the same kernel, while
              // the channel's data is still in L2: fused when the planner finds that cheaper. It
              // weighs the two kernels over the same planes: its cost counts elements, not the
              // flat kernel's wider loads, which would tip small layers (that L2 holds whole) to
              // two launches.
              fused_plan =
                  plan_grad_reduction<scalar_t, kAct, true>(g, pointers, view, /*max_splits=*/1);
              fused = plan::fuse_backward(
                  plan_shape(g, sizeof(scalar_t), 2), fused_plan, split_plan,
                  plan_grad_elementwise<scalar_t, kAct>(g, pointers, view, /*flat=*/false),
                  device_info(view.get_device()).l2_bytes);
            }
            GradReduction<scalar_t, acc_t, kAct> red{
                element.x,
                element.dy,
                element.mean,
                element.invstd,
                nullptr,
                nullptr,
                channel_output<scalar_t, acc_t>(grad_weight, need_weight),
                channel_output<scalar_t, acc_t>(grad_bias, need_bias),
                element};
            if (fused) {
              red.element.out = grad_input.data_ptr<scalar_t>();
              run_grad_reduction(red.with_fused_input(), fused_plan, g, view);
              return;
            }
            at::Tensor sums;
            if (need_input && train) {
              sums = at::empty({2, g.channels}, mean_c.options());
              red.sum_dy = sums[0].data_ptr<acc_t>();
              red.sum_dy_xmu = sums[1].data_ptr<acc_t>();
              element.dy_term = red.sum_dy;
              element.dy_xmu_term = red.sum_dy_xmu;
            }
            run_grad_reduction(red, split_plan, g, view);
            if (need_input) {
              run_grad_input(element, grad_input, g, view);
            }
          });
        });
  }
  if (need_input) {
    grad_input = in_output_format(grad_input, input);
  }
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda(const at::Tensor& grad_output,
                                                        const at::Tensor& input,
                                                        const at::Tensor& mean) {
  constexpr const char* op = "ckbn::backward_reduce";
  check_backward_reduce_args(grad_output, input, mean);
  const KernelInput kin(input, op);
  const at::Tensor& view = kin.view;
  const Geometry& g = kin.geometry;
  const at::Tensor dy = match_strides(grad_output, view);
  const at::Tensor mean_c = mean.contiguous();
  at::Tensor sum_dy = at::empty({g.channels}, mean_c.options());
  at::Tensor sum_dy_xmu = at::empty({g.channels}, mean_c.options());
  if (view.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return {sum_dy, sum_dy_xmu};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "ckbn_backward_reduce", [&] {
        using acc_t = acc_type<scalar_t>;
        GradReduction<scalar_t, acc_t> red{};
        red.x = view.const_data_ptr<scalar_t>();
        red.dy = dy.const_data_ptr<scalar_t>();
        red.mean = mean_c.const_data_ptr<acc_t>();
        red.sum_dy = sum_dy.data_ptr<acc_t>();
        red.sum_dy_xmu = sum_dy_xmu.data_ptr<acc_t>();
        run_grad_reduction(red,
                           plan_grad_reduction<scalar_t, math::Activation::Identity, false>(
                               g, {red.x, red.dy}, view),
                           g, view);
      });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor backward_elemt_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               const c10::optional<at::Tensor>& weight, const at::Tensor& mean_dy,
                               const at::Tensor& mean_dy_xmu) {
  constexpr const char* op = "ckbn::backward_elemt";
  check_backward_elemt_args(grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu);
  const KernelInput kin(input, op);
  const at::Tensor& view = kin.view;
  const Geometry& g = kin.geometry;
  const at::Tensor dy = match_strides(grad_output, view);
  at::Tensor grad_input = at::empty_like(view);
  if (view.numel() == 0) {
    return in_output_format(grad_input, input);
  }
  const auto weight_c = contiguous_if_defined(weight);
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor invstd_c = invstd.contiguous();
  const at::Tensor mean_dy_c = mean_dy.contiguous();
  const at::Tensor mean_dy_xmu_c = mean_dy_xmu.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "ckbn_backward_elemt", [&] {
                                    using acc_t = acc_type<scalar_t>;
                                    const BackwardElementwise<scalar_t, acc_t> element{
                                        view.const_data_ptr<scalar_t>(),
                                        dy.const_data_ptr<scalar_t>(),
                                        nullptr,
                                        mean_c.const_data_ptr<acc_t>(),
                                        invstd_c.const_data_ptr<acc_t>(),
                                        channel_param<scalar_t, acc_t>(weight_c, 1.0),
                                        mean_dy_c.const_data_ptr<acc_t>(),
                                        mean_dy_xmu_c.const_data_ptr<acc_t>(),
                                        acc_t(1),
                                        true};
                                    run_grad_input(element, grad_input, g, view);
                                  });
  return in_output_format(grad_input, input);
}

}  // namespace
}  // namespace gpu
}  // namespace ckbn

TORCH_LIBRARY_IMPL(ckbn, CUDA, m) {
  m.impl("backward", &ckbn::gpu::backward_cuda);
  m.impl("backward_reduce", &ckbn::gpu::backward_reduce_cuda);
  m.impl("backward_elemt", &ckbn::gpu::backward_elemt_cuda);
}
