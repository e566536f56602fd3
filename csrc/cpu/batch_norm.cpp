// The ckbn operators on CPU: argument checks, output allocation and the choice of loops
// (cpu/kernels.h), registered for the CPU dispatch key at the bottom of this file.
#include "ckbn.h"
#include "cpu/kernels.h"
#include "batch_norm_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace ckbn {
namespace {

#ifdef CKBN_CPU_X86_DISPATCH
// Whether this CPU runs each set of loops (the instruction sets of their target strings). ATen
// reports ATEN_CPU_CAPABILITY as asked, even above what the CPU has; the loops must not run there.
bool cpu_runs_avx2_loops() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
         __builtin_cpu_supports("popcnt");
}

bool cpu_runs_avx512_loops() {
  return cpu_runs_avx2_loops() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}
#endif

// The loops compiled for the instruction set ATen itself uses on this CPU, capped at what the CPU
// has.
const cpu::Kernels& kernels() {
  static const cpu::Kernels& chosen = []() -> const cpu::Kernels& {
#ifdef CKBN_CPU_X86_DISPATCH
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && cpu_runs_avx512_loops()) {
      return cpu::kernels_avx512();
    }
    if ((capability == "AVX512" || capability == "AVX2") && cpu_runs_avx2_loops()) {
      return cpu::kernels_avx2();
    }
#endif
    return cpu::kernels_default();
  }();
  return chosen;
}

// The kernel view of input and its loop geometry. ChannelPlanes with one element per plane is
// [N][C] in memory, so it is walked as ChannelsLast rows.
std::pair<at::Tensor, Geometry> loop_view(const at::Tensor& input) {
  auto [view, g] = kernel_view(input);
  if (g.layout == Layout::ChannelPlanes && g.spatial == 1) {
    g.layout = Layout::ChannelsLast;
  }
  return {view, g};
}

// Whether a and b (same shape) put every element at the same offset.
bool same_offsets(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) {
    return true;
  }
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

// An element pass's result in output_format(input); `fill(out)` writes `out` laid out like the
// kernel view x. Only channels-innermost input that torch does not call channels_last, such as
// (N, C, L) transposed from (N, L, C), is written in x's order and then copied.
template <typename Fill>
at::Tensor element_output(const at::Tensor& input, const at::Tensor& x, const Fill& fill) {
  at::Tensor out = at::empty(input.sizes(), x.options().memory_format(output_format(input)));
  if (same_offsets(out, x)) {
    fill(out);
    return out;
  }
  at::Tensor in_view_order = at::empty_like(x);
  fill(in_view_order);
  return out.copy_(in_view_order);
}

at::Tensor channel_tensor(const at::Tensor& input) {
  return at::empty({input.size(1)}, input.options().dtype(stats_dtype(input.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input, double eps) {
  check_batch_stats_args(input, eps);
  const auto [x, g] = loop_view(input);
  at::Tensor mean = channel_tensor(input);
  at::Tensor invstd = channel_tensor(input);
  kernels().batch_stats(x, g, eps, mean, invstd);
  return {mean, invstd};
}

at::Tensor normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                     c10::string_view activation, double activation_param) {
  check_normalize_args(input, mean, invstd, weight, bias);
  const cpu::Fused fused{parse_activation(activation, activation_param, "ckbn::normalize"),
                         activation_param};
  const auto [x, g] = loop_view(input);
  return element_output(input, x, [&](const at::Tensor& output) {
    kernels().normalize(x, g, mean, invstd, weight, bias, fused, output);
  });
}

void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const at::Tensor& num_batches_tracked, const at::Tensor& mean,
                          const at::Tensor& invstd, c10::optional<double> momentum, double eps,
                          int64_t count) {
  constexpr const char* op = "ckbn::update_running_stats";
  check_update_running_stats_args(running_mean, running_var, num_batches_tracked, mean, invstd, eps,
                                  count);
  TORCH_CHECK(mean.device().is_cpu(), op, ": expected mean on the CPU, but got ", mean.device());

  int64_t& batches = *num_batches_tracked.mutable_data_ptr<int64_t>();
  batches += 1;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    const at::Tensor means = mean.contiguous();
    const at::Tensor invstds = invstd.contiguous();
    const acc_t* mean_p = means.const_data_ptr<acc_t>();
    const acc_t* invstd_p = invstds.const_data_ptr<acc_t>();
    const acc_t factor = math::average_factor(momentum.has_value(),
                                              static_cast<acc_t>(momentum.value_or(0.0)), batches);
    // The buffers keep their own dtype and stride; the average is taken in acc_t.
    const auto update = [&](const at::Tensor& running, const auto& batch_value) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), op, [&] {
        scalar_t* r = running.mutable_data_ptr<scalar_t>();
        for (int64_t c = 0; c < mean.numel(); ++c) {
          scalar_t& value = r[c * running.stride(0)];
          value = static_cast<scalar_t>(
              math::running_average(static_cast<acc_t>(value), batch_value(c), factor));
        }
      });
    };
    update(running_mean, [&](int64_t c) { return mean_p[c]; });
    update(running_var, [&](int64_t c) {
      return math::unbiased_var_from_invstd(invstd_p[c], static_cast<acc_t>(eps), count);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const c10::optional<at::Tensor>& weight, bool train,
    std::array<bool, 3> output_mask, const c10::optional<at::Tensor>& bias,
    c10::string_view activation, double activation_param) {
  check_backward_args(grad_output, input, mean, invstd, weight);
  const cpu::Fused fused{check_backward_activation_args(bias, input, activation, activation_param),
                         activation_param};
  const auto [need_input, need_weight, need_bias] = output_mask;
  const auto [x, g] = loop_view(input);
  const at::Tensor dy = match_strides(grad_output, x);

  at::Tensor sum_dy;
  at::Tensor sum_dy_xmu;
  if ((train && need_input) || need_weight || need_bias) {
    sum_dy = channel_tensor(input);
    sum_dy_xmu = channel_tensor(input);
  }
  at::Tensor grad_input = at::empty({0}, input.options());
  if (need_input) {
    grad_input = element_output(input, x, [&](const at::Tensor& out) {
      kernels().backward(dy, x, g, mean, invstd, weight, bias, fused, train, out, sum_dy,
                         sum_dy_xmu);
    });
  } else {
    kernels().backward(dy, x, g, mean, invstd, weight, bias, fused, train, at::Tensor(), sum_dy,
                       sum_dy_xmu);
  }

  const auto param_dtype =
      weight.has_value() && weight->defined() ? weight->scalar_type() : mean.scalar_type();
  const auto no_grad = [&] { return at::empty({0}, mean.options().dtype(param_dtype)); };
  at::Tensor grad_weight = no_grad();
  if (need_weight) {
    AT_DISPATCH_FLOATING_TYPES(sum_dy_xmu.scalar_type(), "ckbn::backward", [&] {
      const at::Tensor invstds = invstd.contiguous();
      const scalar_t* invstd_p = invstds.const_data_ptr<scalar_t>();
      scalar_t* p = sum_dy_xmu.mutable_data_ptr<scalar_t>();  // sum_dy_xmu is not returned
      for (int64_t c = 0; c < g.channels; ++c) {
        p[c] = math::grad_weight_from_sums(p[c], invstd_p[c]);
      }
    });
    grad_weight = sum_dy_xmu.to(param_dtype);
  }
  at::Tensor grad_bias = need_bias ? sum_dy.to(param_dtype) : no_grad();
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output,
                                                   const at::Tensor& input,
                                                   const at::Tensor& mean) {
  check_backward_reduce_args(grad_output, input, mean);
  const auto [x, g] = loop_view(input);
  at::Tensor sum_dy = channel_tensor(input);
  at::Tensor sum_dy_xmu = channel_tensor(input);
  kernels().backward(match_strides(grad_output, x), x, g, mean, at::Tensor(), c10::nullopt,
                     c10::nullopt, cpu::Fused(), true, at::Tensor(), sum_dy, sum_dy_xmu);
  return {sum_dy, sum_dy_xmu};
}

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                          const at::Tensor& mean, const at::Tensor& invstd,
                          const c10::optional<at::Tensor>& weight, const at::Tensor& mean_dy,
                          const at::Tensor& mean_dy_xmu) {
  check_backward_elemt_args(grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu);
  const auto [x, g] = loop_view(input);
  const at::Tensor dy = match_strides(grad_output, x);
  return element_output(input, x, [&](const at::Tensor& grad_input) {
    kernels().backward_elemt(dy, x, g, mean, invstd, weight, mean_dy, mean_dy_xmu, grad_input);
  });
}

}  // namespace
}  // namespace ckbn

TORCH_LIBRARY_IMPL(ckbn, CPU, m) {
  m.impl("batch_stats", &ckbn::batch_stats);
  m.impl("normalize", &ckbn::normalize);
  m.impl("update_running_stats", &ckbn::update_running_stats);
  m.impl("backward", &ckbn::backward);
  m.impl("backward_reduce", &ckbn::backward_reduce);
  m.impl("backward_elemt", &ckbn::backward_elemt);
}
