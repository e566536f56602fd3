// The vectorised loops behind the CPU ops, as a table of entry points.
//
// loops.h is compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp), because at::vec::Vectorized takes its width from the compile target and the
// extension is built with generic flags. batch_norm.cpp picks the table that matches ATen's own
// choice for this CPU (at::get_cpu_capability, which honours ATEN_CPU_CAPABILITY).
//
// Every entry takes the kernel view of the input and its loop geometry, already checked;
// per-channel outputs are (C,) tensors of the statistics dtype that the entry fills.
#pragma once

#include "ckbn.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace ckbn {
namespace cpu {

// The activation fused after the normalization, and its parameter (leaky_relu's slope).
struct Fused {
  math::Activation activation = math::Activation::Identity;
  double param = 0.0;
};

struct Kernels {
  void (*batch_stats)(const at::Tensor& x, const Geometry& g, double eps, const at::Tensor& mean,
                      const at::Tensor& invstd);
  void (*normalize)(const at::Tensor& x, const Geometry& g, const at::Tensor& mean,
                    const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& bias, const Fused& fused,
                    const at::Tensor& output);
  // Fills sum_dy and sum_dy_xmu when they are defined, and grad_input when it is; with train,
  // grad_input uses the batch means of the sums. With a fused activation, dy is the gradient of
  // its output, and the sums are those of the gradient of its input (bias then serves to
  // recompute that input).
  void (*backward)(const at::Tensor& dy, const at::Tensor& x, const Geometry& g,
                   const at::Tensor& mean, const at::Tensor& invstd,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   const Fused& fused, bool train, const at::Tensor& grad_input,
                   const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu);
  void (*backward_elemt)(const at::Tensor& dy, const at::Tensor& x, const Geometry& g,
                         const at::Tensor& mean, const at::Tensor& invstd,
                         const c10::optional<at::Tensor>& weight, const at::Tensor& mean_dy,
                         const at::Tensor& mean_dy_xmu, const at::Tensor& grad_input);
};

// Whether an element pass that moves `bytes_moved` bytes (reads and writes) should write its output
// with streaming stores: true when they exceed the last-level cache that its threads share, so
// that the output's first lines are evicted before the pass ends and nothing after it could read
// them from the cache. A cached store reads each line in before writing it; a streaming store
// does not, which saves a third of the traffic of a normalize. (cache.cpp)
bool streams_output(int64_t bytes_moved);

// Whether this build carries the AVX2 and AVX-512 copies (GCC on x86-64; elsewhere only DEFAULT).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CKBN_CPU_X86_DISPATCH 1
#endif

const Kernels& kernels_default();
#ifdef CKBN_CPU_X86_DISPATCH
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

}  // namespace cpu
}  // namespace ckbn
