// Operator schemas of the `ckbn` library and the argument checks every backend shares.
//
// Shapes: input is (N, C, *); every per-channel tensor is (C,). Statistics (mean, invstd) are
// float32 for half, bfloat16 and float32 input, and float64 for float64 input.
#include "ckbn.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <utility>

namespace ckbn {

at::ScalarType stats_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.defined(), op, ": input is undefined");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(
      dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": expected input of a floating dtype (float64, float32, float16 or bfloat16), but got ",
      dtype);
  TORCH_CHECK(input.dim() >= 2, op,
              ": expected input with at least 2 dimensions (N, C, *), but got ", input.dim(),
              "D input");
  TORCH_CHECK(input.size(1) > 0, op, ": expected input with at least one channel, but got shape ",
              input.sizes());
}

void check_channel_vector(const at::Tensor& vec, const char* name, const at::Tensor& input,
                          at::ScalarType dtype, at::ScalarType alt_dtype, const char* op) {
  TORCH_CHECK(vec.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(vec.device() == input.device(), op, ": expected ", name,
              " to be on the same device as input (", input.device(), "), but got ", vec.device());
  TORCH_CHECK(vec.dim() == 1 && vec.numel() == input.size(1), op, ": ", name, " should contain ",
              input.size(1), " elements not ", vec.numel());
  TORCH_CHECK(vec.scalar_type() == dtype || vec.scalar_type() == alt_dtype, op, ": expected ", name,
              " of dtype ", dtype, (alt_dtype != dtype ? " or " : ""),
              (alt_dtype != dtype ? c10::toString(alt_dtype) : ""), ", but got ",
              vec.scalar_type());
}

void check_affine(const c10::optional<at::Tensor>& param, const char* name, const at::Tensor& input,
                  const char* op) {
  if (param.has_value() && param->defined()) {
    check_channel_vector(*param, name, input, input.scalar_type(), stats_dtype(input.scalar_type()),
                         op);
  }
}

void check_same_shape(const at::Tensor& other, const char* name, const at::Tensor& input,
                      const char* op) {
  TORCH_CHECK(other.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(other.device() == input.device(), op, ": expected ", name,
              " to be on the same device as input (", input.device(), "), but got ",
              other.device());
  TORCH_CHECK(other.sizes() == input.sizes(), op, ": expected ", name, " of shape ", input.sizes(),
              ", but got ", other.sizes());
  TORCH_CHECK(other.scalar_type() == input.scalar_type(), op, ": expected ", name, " of dtype ",
              input.scalar_type(), ", but got ", other.scalar_type());
}

namespace {

// A per-channel statistics vector: (C,) in the statistics dtype of input.
void check_stats(const at::Tensor& vec, const char* name, const at::Tensor& input, const char* op) {
  const auto dtype = stats_dtype(input.scalar_type());
  check_channel_vector(vec, name, input, dtype, dtype, op);
}

}  // namespace

void check_eps(double eps, const char* op) {
  // eps enters sqrt(var + eps): a negative (or NaN) one gives NaN statistics.
  TORCH_CHECK(eps >= 0.0, op, ": expected eps to be non-negative, but got ", eps);
}

void check_batch_stats_args(const at::Tensor& input, double eps) {
  constexpr const char* op = "ckbn::batch_stats";
  check_input(input, op);
  check_eps(eps, op);
}

void check_normalize_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                          const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "ckbn::normalize";
  check_input(input, op);
  check_stats(mean, "mean", input, op);
  check_stats(invstd, "invstd", input, op);
  check_affine(weight, "weight", input, op);
  check_affine(bias, "bias", input, op);
}

void check_update_running_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                                     const at::Tensor& num_batches_tracked, const at::Tensor& mean,
                                     const at::Tensor& invstd, double eps, int64_t count) {
  constexpr const char* op = "ckbn::update_running_stats";
  TORCH_CHECK(count >= 2, op, ": expected count of at least 2, but got ", count);
  check_eps(eps, op);
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"running_mean", &running_mean},
      {"running_var", &running_var},
      {"num_batches_tracked", &num_batches_tracked},
      {"invstd", &invstd}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == mean.device(), op, ": expected ", name,
                " to be on the same device as mean (", mean.device(), "), but got ", t->device());
  }
  TORCH_CHECK(mean.dim() == 1 && running_mean.sizes() == mean.sizes() &&
                  running_var.sizes() == mean.sizes() && invstd.sizes() == mean.sizes(),
              op, ": running_mean, running_var, mean and invstd should all have shape ",
              mean.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, op,
              ": expected mean of dtype float32 or float64, but got ", mean.scalar_type());
  TORCH_CHECK(invstd.scalar_type() == mean.scalar_type(), op, ": expected invstd of dtype ",
              mean.scalar_type(), ", but got ", invstd.scalar_type());
  for (const auto& [name, t] : {others[0], others[1]}) {
    const auto dtype = t->scalar_type();
    TORCH_CHECK(
        dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
        op, ": expected ", name, " of a floating dtype, but got ", dtype);
  }
  TORCH_CHECK(num_batches_tracked.scalar_type() == at::kLong && num_batches_tracked.numel() == 1,
              op, ": expected num_batches_tracked to hold one int64 value, but got ",
              num_batches_tracked.scalar_type(), " of shape ", num_batches_tracked.sizes());
}

void check_backward_reduce_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& mean) {
  constexpr const char* op = "ckbn::backward_reduce";
  check_input(input, op);
  check_same_shape(grad_output, "grad_output", input, op);
  check_stats(mean, "mean", input, op);
}

void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& mean, const at::Tensor& invstd,
                         const c10::optional<at::Tensor>& weight) {
  constexpr const char* op = "ckbn::backward";
  check_input(input, op);
  check_same_shape(grad_output, "grad_output", input, op);
  check_stats(mean, "mean", input, op);
  check_stats(invstd, "invstd", input, op);
  check_affine(weight, "weight", input, op);
}

math::Activation check_backward_activation_args(const c10::optional<at::Tensor>& bias,
                                                const at::Tensor& input,
                                                c10::string_view activation,
                                                double activation_param) {
  constexpr const char* op = "ckbn::backward";
  check_affine(bias, "bias", input, op);
  return parse_activation(activation, activation_param, op);
}

void check_backward_elemt_args(const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               const c10::optional<at::Tensor>& weight, const at::Tensor& mean_dy,
                               const at::Tensor& mean_dy_xmu) {
  constexpr const char* op = "ckbn::backward_elemt";
  check_input(input, op);
  check_same_shape(grad_output, "grad_output", input, op);
  check_stats(mean, "mean", input, op);
  check_stats(invstd, "invstd", input, op);
  check_stats(mean_dy, "mean_dy", input, op);
  check_stats(mean_dy_xmu, "mean_dy_xmu", input, op);
  check_affine(weight, "weight", input, op);
}

at::MemoryFormat output_format(const at::Tensor& input) {
  // An empty tensor is contiguous whatever its strides; they alone tell a channels_last one apart.
  const bool not_plain_contiguous = input.numel() == 0 || !input.is_contiguous();
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast) &&
      not_plain_contiguous) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d) &&
      not_plain_contiguous) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

math::Activation parse_activation(c10::string_view name, double param, const char* op) {
  // The names of ckbn.activations.ACTIVATIONS, in its order.
  static constexpr std::pair<const char*, math::Activation> kNames[] = {
      {"identity", math::Activation::Identity}, {"relu", math::Activation::Relu},
      {"relu6", math::Activation::Relu6},       {"leaky_relu", math::Activation::LeakyRelu},
      {"silu", math::Activation::Silu},         {"hardswish", math::Activation::Hardswish}};
  for (const auto& [known, act] : kNames) {
    if (name == known) {
      if (act == math::Activation::LeakyRelu) {
        TORCH_CHECK(
            std::isfinite(param), op,
            ": leaky_relu's negative slope (activation_param) must be a finite number, but got ",
            param);
      } else {
        TORCH_CHECK(param == 0.0, op, ": activation '", known,
                    "' takes no parameter, but got activation_param=", param);
      }
      return act;
    }
  }
  TORCH_CHECK(false, op,
              ": activation must be one of 'identity', 'relu', 'relu6', 'leaky_relu', 'silu', "
              "'hardswish', but got '",
              name, "'");
}

namespace {

// True when `t` is dense with dimension 1 innermost: (N, C, *) stored as (N, *, C).
bool is_channels_innermost(const at::Tensor& t) { return t.movedim(1, -1).is_contiguous(); }

}  // namespace

std::pair<at::Tensor, Geometry> kernel_view(const at::Tensor& input) {
  int64_t spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) {
    spatial *= input.size(d);
  }
  const auto geometry = [&](Layout layout) {
    return Geometry{input.size(0), input.size(1), spatial, layout};
  };
  // Contiguous input with spatial dimensions is read plane by plane. Dense input with C innermost
  // (channels_last, and contiguous 2-D (N, C)) is read as rows of C. Anything else is copied.
  if (input.dim() > 2 && input.is_contiguous()) {
    return {input, geometry(Layout::ChannelPlanes)};
  }
  if (is_channels_innermost(input)) {
    return {input, geometry(Layout::ChannelsLast)};
  }
  return kernel_view(input.contiguous());
}

at::Tensor match_strides(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) {
    return t;
  }
  at::Tensor out = at::empty_like(like);  // dense `like`: empty_like keeps its strides
  out.copy_(t);
  return out;
}

}  // namespace ckbn

TORCH_LIBRARY(ckbn, m) {
  // Per-channel mean and invstd = 1 / sqrt(biased_var + eps) over every dimension but 1.
  m.def("batch_stats(Tensor input, float eps) -> (Tensor mean, Tensor invstd)");
  // activation((input - mean) * invstd * weight + bias), in input's dtype and memory format.
  // activation is one of ckbn.activations.ACTIVATIONS; activation_param is leaky_relu's negative
  // slope (0 for the others).
  m.def(
      "normalize(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
      "str activation=\"identity\", float activation_param=0.0) -> Tensor");
  // Counts one batch in num_batches_tracked and folds (mean, unbiased var) into the running
  // statistics, with `momentum`, or for momentum=None the cumulative average. `count` is the
  // number of elements each channel's statistics were taken over (at least 2).
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!) num_batches_tracked, Tensor mean, Tensor invstd, float? momentum, float eps, "
      "int count) -> ()");
  // Gradients of normalize. With train=True, mean and invstd are taken to be the batch statistics
  // of input and the full training-mode gradient is returned. An output whose mask entry is false
  // is returned as an empty tensor of shape (0,). With a fused activation, grad_output is the
  // gradient of the activation's output; the pre-activation is recomputed from input, the
  // statistics, weight and bias.
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
      "bool train, bool[3] output_mask, Tensor? bias=None, str activation=\"identity\", "
      "float activation_param=0.0) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The reduction half of the training backward, for statistics shared across processes:
  // per-channel sum(grad_output) and sum(grad_output * (input - mean)), in the statistics dtype.
  m.def(
      "backward_reduce(Tensor grad_output, Tensor input, Tensor mean) -> (Tensor sum_dy, "
      "Tensor sum_dy_xmu)");
  // The element-wise half: grad_input from the batch-wide means of the two sums above.
  m.def(
      "backward_elemt(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? "
      "weight, "
      "Tensor mean_dy, Tensor mean_dy_xmu) -> Tensor");
}
