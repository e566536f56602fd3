// Declarations shared by the ckbn backends: argument checks and the memory layouts kernels see.
//
// Schemas live in ops.cpp (TORCH_LIBRARY(ckbn, m)); each backend registers its kernels beside them
// in its own TORCH_LIBRARY_IMPL blocks (cpu/batch_norm.cpp, the op files of cuda/). Every kernel
// calls the checks below before it touches memory, so bad input is a RuntimeError on every backend.
#pragma once

#include "batch_norm_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>

namespace ckbn {

// How one channel's elements lie in memory, after `kernel_view` below.
//   ChannelPlanes: [batch][channels][spatial], each (n, c) plane contiguous (NCHW, NCL, NCDHW).
//   ChannelsLast:  [rows][channels], channels innermost (NHWC, NDHWC, and 2-D (N, C) input).
enum class Layout { ChannelPlanes, ChannelsLast };

struct Geometry {
  int64_t batch;     // N
  int64_t channels;  // C
  int64_t spatial;   // product of the dimensions after C (1 for 2-D input)
  Layout layout;

  int64_t per_channel() const { return batch * spatial; }  // reduction size of one channel
  int64_t rows() const { return batch * spatial; }         // ChannelsLast: number of C-vectors
};

// The accumulation / statistics dtype for an input dtype: double for double, float otherwise.
at::ScalarType stats_dtype(at::ScalarType input_dtype);

// Checks that `input` is a floating tensor of at least 2 dimensions with a supported dtype.
void check_input(const at::Tensor& input, const char* op);

// Checks a per-channel vector: 1-D, `channels` elements, on input's device, with one of the
// dtypes allowed (`dtype`, or `alt_dtype` when it differs). `name` appears in the message.
void check_channel_vector(const at::Tensor& vec, const char* name, const at::Tensor& input,
                          at::ScalarType dtype, at::ScalarType alt_dtype, const char* op);

// Checks an optional affine parameter: input's dtype or the statistics dtype (AMP keeps fp32
// parameters beside half input).
void check_affine(const c10::optional<at::Tensor>& param, const char* name, const at::Tensor& input,
                  const char* op);

// Checks that `other` (grad_output) has input's shape, dtype and device.
void check_same_shape(const at::Tensor& other, const char* name, const at::Tensor& input,
                      const char* op);

// Each operator's argument contract (see the schemas in ops.cpp), checked by every backend before
// it touches memory, so that bad input is the same RuntimeError whichever backend runs.
// eps must be non-negative (batch_stats and update_running_stats; the modules want it positive in
// training, as torch does, and say so before calling an op).
void check_eps(double eps, const char* op);

void check_batch_stats_args(const at::Tensor& input, double eps);
void check_normalize_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                          const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias);
void check_update_running_stats_args(const at::Tensor& running_mean, const at::Tensor& running_var,
                                     const at::Tensor& num_batches_tracked, const at::Tensor& mean,
                                     const at::Tensor& invstd, double eps, int64_t count);
void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& mean, const at::Tensor& invstd,
                         const c10::optional<at::Tensor>& weight);
// backward's fused-activation arguments: bias as an affine parameter, then parse_activation.
math::Activation check_backward_activation_args(const c10::optional<at::Tensor>& bias,
                                                const at::Tensor& input,
                                                c10::string_view activation,
                                                double activation_param);
void check_backward_reduce_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& mean);
void check_backward_elemt_args(const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               const c10::optional<at::Tensor>& weight, const at::Tensor& mean_dy,
                               const at::Tensor& mean_dy_xmu);

// The memory format of element-wise results (grad_input too), as the reference and the fake
// kernels give them: channels_last and channels_last_3d input, an empty batch included, keep
// theirs; anything else is contiguous.
at::MemoryFormat output_format(const at::Tensor& input);

// The fused activation named by normalize's and backward's `activation` argument, checked with its
// parameter (leaky_relu's negative slope: finite; the others take none, so 0).
math::Activation parse_activation(c10::string_view name, double param, const char* op);

// A dense view of `input` in one of the two layouts kernels handle, plus its geometry. Dense
// channels_last input (C innermost) stays as it is; contiguous input is ChannelPlanes; anything
// else is made contiguous.
std::pair<at::Tensor, Geometry> kernel_view(const at::Tensor& input);

// `t` (same shape as the kernel view `like`) with exactly like's strides, copying only if needed:
// grad_output may arrive in a different memory format than the input.
at::Tensor match_strides(const at::Tensor& t, const at::Tensor& like);

}  // namespace ckbn
