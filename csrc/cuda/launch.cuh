// The host side of the CUDA operators: launch plans (launch_plan.h) from the limits of the
// device, the launch of a planned kernel of kernels.cuh or flat_kernel.cuh, and the argument
// handling the operator files (stats.cu, normalize.cu, backward.cu, running_stats.cu) share.
#pragma once

#include "flat_kernel.cuh"
#include "kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>

namespace ckbn {
namespace gpu {

// ---------------------------------------------------------------------------------------------
// Host side: launch plans (launch_plan.h) from the limits of the device.

constexpr int kMaxDevices = 64;

// The device's SM count and L2 size, asked once per device.
struct DeviceInfo {
  int multiprocessors;
  int64_t l2_bytes;
};

inline DeviceInfo device_info(int device) {
  // Both attributes in one word (SM count low, L2 bytes high; 0: not asked yet), so that a caller
  // that sees one sees the other: two separate relaxed stores could be seen half done.
  static std::array<std::atomic<uint64_t>, kMaxDevices> packed{};
  const bool cached = device >= 0 && device < kMaxDevices;
  const uint64_t word = cached ? packed[device].load(std::memory_order_relaxed) : 0;
  if (word != 0) {
    return DeviceInfo{static_cast<int>(word & 0xffffffffu), static_cast<int64_t>(word >> 32)};
  }
  int multiprocessors = 0;
  int l2_bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  if (cached && multiprocessors > 0) {  // racing callers store the same word
    packed[device].store(static_cast<uint64_t>(static_cast<uint32_t>(multiprocessors)) |
                             (static_cast<uint64_t>(static_cast<uint32_t>(l2_bytes)) << 32),
                         std::memory_order_relaxed);
  }
  return DeviceInfo{multiprocessors, l2_bytes};
}

// Resident blocks per SM of `Kernel` at kThreads threads, asked once per kernel and device (on
// the current device, which KernelInput's guard has set).
template <auto Kernel>
int blocks_per_multiprocessor(int device) {
  static std::array<std::atomic<int>, kMaxDevices> cache{};  // 0: not asked yet
  const bool cached = device >= 0 && device < kMaxDevices;
  int blocks = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (blocks == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, kThreads, 0));
    blocks = blocks < 1 ? 1 : blocks;
    if (cached) {
      cache[device].store(blocks, std::memory_order_relaxed);
    }
  }
  return blocks;
}

template <auto Kernel>
plan::DeviceLimits device_limits(int device) {
  const DeviceInfo info = device_info(device);
  return plan::DeviceLimits{info.multiprocessors, blocks_per_multiprocessor<Kernel>(device),
                            info.l2_bytes};
}

// The planner's view of a kernel over `g` with `inputs` full-size inputs of `element_size` bytes.
inline plan::Shape plan_shape(const Geometry& g, int element_size, int inputs) {
  TORCH_CHECK(g.channels < (int64_t{1} << 31), "ckbn: at most 2^31 - 1 channels are supported");
  return plan::Shape{g.batch,      g.channels, g.spatial, g.layout == Layout::ChannelsLast,
                     element_size, inputs};
}

// The largest power of two, at most 16, that divides every (non-null) address.
inline int aligned_bytes(std::initializer_list<const void*> pointers) {
  int bytes = 16;
  for (const void* p : pointers) {
    while (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
      bytes /= 2;
    }
  }
  return bytes;
}

// Calls f(std::integral_constant<int, vec>) for the plan's vector width, one of 1, 2, 4 ...
// kWidest: each width a kernel may run with is instantiated, and only those.
template <int kWidest, typename F>
void with_vector_width(int vec, F&& f) {
  if constexpr (kWidest > 1) {
    if (vec == kWidest) {
      f(std::integral_constant<int, kWidest>{});
    } else {
      with_vector_width<kWidest / 2>(vec, f);
    }
  } else {
    TORCH_INTERNAL_ASSERT(vec == 1, "ckbn: unplanned vector width ", vec);
    f(std::integral_constant<int, 1>{});
  }
}

// Calls rows(width) or planes(width) by the layout, with width a std::integral_constant of the
// planned vector width: only the widths each layout may plan for kKind are instantiated.
template <plan::Kind kKind, typename scalar_t, typename Rows, typename Planes>
void with_layout_width(bool channels_last, int vec, Rows&& rows, Planes&& planes) {
  constexpr int element_size = sizeof(scalar_t);
  if (channels_last) {
    with_vector_width<plan::max_vector_width(kKind, true, element_size)>(vec, rows);
  } else {
    with_vector_width<plan::max_vector_width(kKind, false, element_size)>(vec, planes);
  }
}

// The walk's step for a launch of p.grid blocks over p.tiles tiles.
inline GridStep grid_step(const plan::Plan& p) {
  return p.tiles > 0 ? GridStep{static_cast<unsigned>(p.grid % p.tiles),
                                static_cast<unsigned>(p.grid / p.tiles)}
                     : GridStep{0, 0};
}

inline PlaneTiling plane_tiling(const plan::Plan& p, const Geometry& g) {
  return PlaneTiling{g.batch,          g.channels, g.spatial, p.batch_chunk, p.spatial_chunk,
                     p.spatial_splits, p.splits,   p.units,   grid_step(p)};
}

inline RowTiling row_tiling(const plan::Plan& p, const Geometry& g) {
  return RowTiling{g.rows(), g.channels, p.row_chunk, p.tiles, p.splits, p.units, grid_step(p)};
}

// The plan of a reduction (at most max_splits blocks per channel tile) over `g` that reads and
// writes `pointers`.
template <typename Red>
plan::Plan plan_reduction(const Geometry& g, std::initializer_list<const void*> pointers,
                          const at::Tensor& on, int64_t max_splits = plan::kMaxSplits) {
  const plan::Shape shape = plan_shape(g, sizeof(typename Red::scalar_type), Red::kInputs);
  const int vec = plan::vector_width(plan::Kind::Reduce, shape, aligned_bytes(pointers));
  const int device = on.get_device();
  plan::DeviceLimits limits{};
  with_layout_width<plan::Kind::Reduce, typename Red::scalar_type>(
      shape.channels_last, vec,
      [&](auto w) { limits = device_limits<reduce_rows_kernel<Red, decltype(w)::value>>(device); },
      [&](auto w) {
        limits = device_limits<reduce_planes_kernel<Red, decltype(w)::value>>(device);
      });
  return plan::plan_launch(plan::Kind::Reduce, shape, vec, limits, max_splits);
}

inline FlatTiling flat_tiling(const plan::Plan& p, const Geometry& g) {
  const int64_t grid_elements = p.grid * p.flat_groups * kThreads * p.rows * p.vec;
  return FlatTiling{g.batch * g.channels * g.spatial,
                    p.units,
                    static_cast<unsigned>(g.spatial),
                    static_cast<unsigned>(g.channels),
                    static_cast<unsigned>(p.flat_groups),
                    static_cast<unsigned>((grid_elements / g.spatial) % g.channels),
                    static_cast<unsigned>(grid_elements % g.spatial)};
}

// The flat kernel's one vector width: 16 bytes.
template <typename Op>
constexpr int kFlatVec =
    plan::max_vector_width(plan::Kind::Elementwise, false, sizeof(typename Op::scalar_type));

// With flat = false, only planes or rows plans (see backward.cu's fusion decision).
template <typename Op>
plan::Plan plan_elementwise(const Geometry& g, std::initializer_list<const void*> pointers,
                            const at::Tensor& on, bool flat = true) {
  const plan::Shape shape = plan_shape(g, sizeof(typename Op::scalar_type), Op::kInputs);
  const int aligned = aligned_bytes(pointers);
  const int vec = plan::vector_width(plan::Kind::Elementwise, shape, aligned);
  const int device = on.get_device();
  if (flat && plan::flat_vector_width(shape, vec, aligned) == kFlatVec<Op>) {
    const plan::Plan flat_plan = plan::plan_flat(
        shape, kFlatVec<Op>, device_limits<elementwise_flat_kernel<Op, kFlatVec<Op>>>(device));
    if (plan::flat_fills(flat_plan)) {
      return flat_plan;
    }
  }
  plan::DeviceLimits limits{};
  with_layout_width<plan::Kind::Elementwise, typename Op::scalar_type>(
      shape.channels_last, vec,
      [&](auto w) {
        limits = device_limits<elementwise_rows_kernel<Op, decltype(w)::value>>(device);
      },
      [&](auto w) {
        limits = device_limits<elementwise_planes_kernel<Op, decltype(w)::value>>(device);
      });
  return plan::plan_launch(plan::Kind::Elementwise, shape, vec, limits);
}

// The arrival counters of a split reduction over `tiles` tiles on the current stream, all zero:
// the last block of each tile resets its counter, so a buffer made zero once stays so between
// launches. One buffer per device and stream, since launches on one stream never overlap; while a
// CUDA graph is captured, a fresh one whose zeroing the graph records.
inline unsigned* arrival_counters(const at::Tensor& like, int64_t tiles) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto options = like.options().dtype(at::kInt);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    // The graph records the zero fill before the kernel, so every replay starts from zeros, even
    // if a later allocation of the same capture reuses the memory after the kernel.
    return reinterpret_cast<unsigned*>(at::zeros({tiles}, options).data_ptr<int>());
  }
  static std::mutex mutex;
  // Never destroyed: a tensor freed at exit could outlive the CUDA context.
  static auto* buffers = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = (*buffers)[{like.get_device(), stream}];
  if (!buffer.defined() || buffer.numel() < tiles) {
    buffer = at::zeros({std::max<int64_t>(tiles, 4096)}, options);
  }
  return reinterpret_cast<unsigned*>(buffer.data_ptr<int>());
}

// One launch: a split plan's blocks leave partial states in a staging buffer and the last block
// of each tile merges them.
template <typename Red>
void run_reduction(const Red& red, const plan::Plan& p, const Geometry& g, const at::Tensor& like) {
  using State = typename Red::State;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor staging;
  State* partial = nullptr;
  unsigned* arrivals = nullptr;
  if (p.splits > 1) {
    staging = at::empty({p.splits * g.channels * static_cast<int64_t>(sizeof(State))},
                        like.options().dtype(at::kByte));
    partial = reinterpret_cast<State*>(staging.data_ptr());
    arrivals = arrival_counters(like, p.tiles);
  }
  const dim3 grid(static_cast<unsigned>(p.grid));
  const dim3 block(p.block_x, p.block_y);
  with_layout_width<plan::Kind::Reduce, typename Red::scalar_type>(
      p.channels_last, p.vec,
      [&](auto w) {
        reduce_rows_kernel<Red, decltype(w)::value>
            <<<grid, block, 0, stream>>>(red, row_tiling(p, g), partial, arrivals);
      },
      [&](auto w) {
        reduce_planes_kernel<Red, decltype(w)::value>
            <<<grid, block, 0, stream>>>(red, plane_tiling(p, g), partial, arrivals);
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Op>
void run_elementwise(const Op& op, const plan::Plan& p, const Geometry& g) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(p.grid));
  const dim3 block(p.block_x, p.block_y);
  if (p.flat) {
    constexpr int kVec = kFlatVec<Op>;
    TORCH_INTERNAL_ASSERT(p.vec == kVec, "ckbn: unplanned flat vector width ", p.vec);
    elementwise_flat_kernel<Op, kVec><<<grid, block, 0, stream>>>(op, flat_tiling(p, g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  with_layout_width<plan::Kind::Elementwise, typename Op::scalar_type>(
      p.channels_last, p.vec,
      [&](auto w) {
        elementwise_rows_kernel<Op, decltype(w)::value>
            <<<grid, block, 0, stream>>>(op, row_tiling(p, g));
      },
      [&](auto w) {
        elementwise_planes_kernel<Op, decltype(w)::value>
            <<<grid, block, 0, stream>>>(op, plane_tiling(p, g));
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Host side: argument handling shared by the operators.

// The input of an operator whose arguments passed the shared checks (which name any tensor on
// the wrong device): the guard that puts the kernels on input's device, and the kernel view.
struct KernelInput {
  KernelInput(const at::Tensor& input, const char* op) : guard(cuda_device(input, op)) {
    std::tie(view, geometry) = kernel_view(input);
    if (geometry.spatial == 1) {
      // [N][C][1] is [N][C]: the channels-last kernels read it along C, coalesced.
      geometry.layout = Layout::ChannelsLast;
    }
  }

  static c10::Device cuda_device(const at::Tensor& input, const char* op) {
    TORCH_CHECK(input.is_cuda(), op, ": expected input on a CUDA device, but got ", input.device());
    return input.device();
  }

  c10::cuda::CUDAGuard guard;
  at::Tensor view;
  Geometry geometry;
};

inline c10::optional<at::Tensor> contiguous_if_defined(const c10::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined()) {
    return t->contiguous();
  }
  return c10::nullopt;
}

template <typename scalar_t, typename acc_t>
ChannelParam<scalar_t, acc_t> channel_param(const c10::optional<at::Tensor>& t, double absent) {
  ChannelParam<scalar_t, acc_t> p{nullptr, nullptr, static_cast<acc_t>(absent)};
  if (t.has_value()) {
    if (t->scalar_type() == c10::CppTypeToScalarType<acc_t>::value) {
      p.wide = t->const_data_ptr<acc_t>();
    } else {
      p.narrow = t->const_data_ptr<scalar_t>();
    }
  }
  return p;
}

template <typename scalar_t, typename acc_t>
ChannelOutput<scalar_t, acc_t> channel_output(const at::Tensor& t, bool wanted) {
  ChannelOutput<scalar_t, acc_t> out{nullptr, nullptr};
  if (wanted) {
    if (t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) {
      out.wide = t.data_ptr<acc_t>();
    } else {
      out.narrow = t.data_ptr<scalar_t>();
    }
  }
  return out;
}

// `out` in output_format(input). Kernels write in the kernel view's layout, which differs only for
// C-innermost input of other ranks.
inline at::Tensor in_output_format(const at::Tensor& out, const at::Tensor& input) {
  const auto format = output_format(input);
  return out.is_contiguous(format) ? out : out.contiguous(format);
}

// ---------------------------------------------------------------------------------------------

// The backward's kernels, planned and launched by grad_reduction.cu and grad_elementwise.cu (for
// each dtype and fused activation, rather than in backward.cu) so that the largest op family
// compiles as two units.
template <typename scalar_t, math::Activation act, bool fuse_input>
plan::Plan plan_grad_reduction(const Geometry& g, std::initializer_list<const void*> pointers,
                               const at::Tensor& on, int64_t max_splits = plan::kMaxSplits);
template <typename scalar_t, math::Activation act, bool fuse_input>
void run_grad_reduction(const GradReduction<scalar_t, acc_type<scalar_t>, act, fuse_input>& red,
                        const plan::Plan& p, const Geometry& g, const at::Tensor& like);
template <typename scalar_t, math::Activation act>
plan::Plan plan_grad_elementwise(const Geometry& g, std::initializer_list<const void*> pointers,
                                 const at::Tensor& on, bool flat = true);
template <typename scalar_t, math::Activation act>
void run_grad_elementwise(const BackwardElementwise<scalar_t, acc_type<scalar_t>, act>& op,
                          const plan::Plan& p, const Geometry& g);

// M(scalar_t, act) for each input dtype and each fused activation: the instantiations above.
// clang-format off
// A list of macro calls with no separators, which clang-format would indent as
// one statement continued, a little further on each pass.
#define CKBN_FOR_EACH_ACTIVATION(M, scalar_t)                                                 \
  M(scalar_t, math::Activation::Identity)                                                     \
  M(scalar_t, math::Activation::Relu)                                                         \
  M(scalar_t, math::Activation::Relu6)                                                        \
  M(scalar_t, math::Activation::LeakyRelu)                                                    \
  M(scalar_t, math::Activation::Silu)                                                         \
  M(scalar_t, math::Activation::Hardswish)
#define CKBN_FOR_EACH_DTYPE_AND_ACTIVATION(M)                                                 \
  CKBN_FOR_EACH_ACTIVATION(M, double)                                                         \
  CKBN_FOR_EACH_ACTIVATION(M, float)                                                          \
  CKBN_FOR_EACH_ACTIVATION(M, at::Half)                                                       \
  CKBN_FOR_EACH_ACTIVATION(M, at::BFloat16)
// clang-format on

}  // namespace gpu
}  // namespace ckbn
