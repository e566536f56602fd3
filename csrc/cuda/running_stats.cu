// ckbn::update_running_stats on CUDA: one small kernel over the running buffers, in place.
#include "launch.cuh"

#include <torch/library.h>

namespace ckbn {
namespace gpu {
namespace {

// A running buffer of any floating dtype (the module may keep them in half, or in float beside
// double input), possibly strided: it is updated in place, so it cannot be copied.
struct RunningBuffer {
  enum class Kind : int { Double, Float, Half, BFloat16 };
  void* data;
  int64_t stride;
  Kind kind;

  template <typename acc_t>
  __device__ __forceinline__ acc_t load(int64_t i) const {
    switch (kind) {
      case Kind::Double:
        return static_cast<acc_t>(static_cast<const double*>(data)[i * stride]);
      case Kind::Float:
        return static_cast<acc_t>(static_cast<const float*>(data)[i * stride]);
      case Kind::Half:
        return static_cast<acc_t>(
            static_cast<float>(static_cast<const at::Half*>(data)[i * stride]));
      default:
        return static_cast<acc_t>(
            static_cast<float>(static_cast<const at::BFloat16*>(data)[i * stride]));
    }
  }
  template <typename acc_t>
  __device__ __forceinline__ void store(int64_t i, acc_t v) const {
    switch (kind) {
      case Kind::Double:
        static_cast<double*>(data)[i * stride] = static_cast<double>(v);
        break;
      case Kind::Float:
        static_cast<float*>(data)[i * stride] = static_cast<float>(v);
        break;
      case Kind::Half:
        static_cast<at::Half*>(data)[i * stride] = at::Half(static_cast<float>(v));
        break;
      default:
        static_cast<at::BFloat16*>(data)[i * stride] = at::BFloat16(static_cast<float>(v));
        break;
    }
  }
};

// One block: num_batches_tracked is read on the device, so the host never waits for it.
template <typename acc_t>
__global__ void update_running_stats_kernel(RunningBuffer running_mean, RunningBuffer running_var,
                                            int64_t* num_batches_tracked, const acc_t* mean,
                                            const acc_t* invstd, int64_t channels,
                                            bool has_momentum, acc_t momentum, acc_t eps,
                                            int64_t count) {
  const int64_t batches = *num_batches_tracked + 1;
  const acc_t factor = math::average_factor(has_momentum, momentum, batches);
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    running_mean.store(c, math::running_average(running_mean.load<acc_t>(c), mean[c], factor));
    const acc_t unbiased_var = math::unbiased_var_from_invstd(invstd[c], eps, count);
    running_var.store(c, math::running_average(running_var.load<acc_t>(c), unbiased_var, factor));
  }
  __syncthreads();  // every thread has read the old count before it changes
  if (threadIdx.x == 0) {
    *num_batches_tracked = batches;
  }
}

RunningBuffer running_buffer(const at::Tensor& t) {
  RunningBuffer b{t.data_ptr(), t.numel() > 0 ? t.stride(0) : 1, RunningBuffer::Kind::Float};
  switch (t.scalar_type()) {
    case at::kDouble:
      b.kind = RunningBuffer::Kind::Double;
      break;
    case at::kFloat:
      b.kind = RunningBuffer::Kind::Float;
      break;
    case at::kHalf:
      b.kind = RunningBuffer::Kind::Half;
      break;
    case at::kBFloat16:
      b.kind = RunningBuffer::Kind::BFloat16;
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "unchecked running buffer dtype ", t.scalar_type());
  }
  return b;
}

void update_running_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                               const at::Tensor& num_batches_tracked, const at::Tensor& mean,
                               const at::Tensor& invstd, c10::optional<double> momentum, double eps,
                               int64_t count) {
  constexpr const char* op = "ckbn::update_running_stats";
  check_update_running_stats_args(running_mean, running_var, num_batches_tracked, mean, invstd, eps,
                                  count);
  TORCH_CHECK(mean.is_cuda(), op, ": expected mean on a CUDA device, but got ", mean.device());
  const c10::cuda::CUDAGuard guard(mean.device());
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor invstd_c = invstd.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "ckbn_update_running_stats", [&] {
    using acc_t = scalar_t;
    update_running_stats_kernel<acc_t><<<1, kThreads, 0, stream>>>(
        running_buffer(running_mean), running_buffer(running_var),
        num_batches_tracked.data_ptr<int64_t>(), mean_c.const_data_ptr<acc_t>(),
        invstd_c.const_data_ptr<acc_t>(), mean.numel(), momentum.has_value(),
        static_cast<acc_t>(momentum.value_or(0.0)), static_cast<acc_t>(eps), count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace gpu
}  // namespace ckbn

TORCH_LIBRARY_IMPL(ckbn, CUDA, m) {
  m.impl("update_running_stats", &ckbn::gpu::update_running_stats_cuda);
}
