// Runs CUDA kernels on the host: each CUDA thread of a block is a std::thread, blocks run one at a
// time, __syncthreads and __syncwarp are barriers and warp shuffles go through a per-warp buffer.
//
// It exists so that the kernels of csrc/cuda can be executed and compared with the reference on a
// machine without a GPU: their index arithmetic, block merges, split reductions and vector paths
// run exactly as written. It says nothing about performance or about memory-model subtleties
// (every emulated thread sees every write at once).
//
// Hooks let tests/cuda_emulation/traffic.cpp observe launches: it records each launch's kernel and
// shape, can skip running it (to read the launch plans of full-size shapes), and counts the bytes
// kernel threads read and write in tensor storage (`in_kernel` tells its counters who is running).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one after another, so one copy of a block's shared memory serves every block.
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace emu {

struct BlockSync {
  explicit BlockSync(int threads) : block(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) {
      const int lanes = std::min(32, threads - 32 * w);
      warps.push_back(std::make_unique<std::barrier<>>(lanes));
    }
    exchange.resize(threads);
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::uint64_t> exchange;  // one slot per thread for shuffles
};

inline thread_local BlockSync* current = nullptr;
inline thread_local int linear_tid = 0;
inline thread_local bool in_kernel = false;  // this thread is running kernel code

// Set by an observer of launches (traffic.cpp); all optional.
struct LaunchHooks {
  // Before a launch, on the launching thread: false skips running it. grid_stride: 1 if a block
  // takes several work units, 0 if not, -1 if no kernel argument says (see grid_stride_of).
  bool (*begin)(const void* kernel, dim3 grid, dim3 block, std::size_t shared_bytes,
                int grid_stride) = nullptr;
  void (*end)() = nullptr;  // after the launch's last block
  // Resident blocks per multiprocessor for a kernel, block size and dynamic shared memory.
  int (*occupancy)(const void* kernel, int block_threads, std::size_t shared_bytes) = nullptr;
};
inline LaunchHooks hooks;

inline long env_or(const char* name, long fallback) {
  const char* env = std::getenv(name);
  return env != nullptr ? std::atol(env) : fallback;
}

// What the emulated device reports, which sets the launch plans (CKBN_EMULATED_*): multiprocessors,
// resident blocks of every kernel per multiprocessor unless the launch observer says, and L2 bytes
// (small, so that both the fused and the two-kernel backward run).
inline int multiprocessors() { return static_cast<int>(env_or("CKBN_EMULATED_SMS", 4)); }
inline int blocks_per_multiprocessor() {
  return static_cast<int>(env_or("CKBN_EMULATED_BLOCKS_PER_SM", 2));
}
inline long l2_bytes() { return env_or("CKBN_EMULATED_L2_BYTES", 256 << 10); }

// Whether a kernel argument describes a grid-stride launch: its `grid_stride` flag, or more
// `units` of work than the grid has blocks; -1 if it has neither.
template <typename T>
int grid_stride_of(const T& arg, long blocks) {
  if constexpr (requires { static_cast<bool>(arg.grid_stride); }) {
    return arg.grid_stride ? 1 : 0;
  } else if constexpr (requires { static_cast<long>(arg.units); }) {
    return static_cast<long>(arg.units) > blocks ? 1 : 0;
  } else {
    return -1;
  }
}

// Runs kernel(args...) over the grid. One std::thread per CUDA thread of a block, created once per
// launch; each block gets fresh barriers, since threads that exit early drop out of them.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, std::size_t shared_bytes, void* /*stream*/,
            void (*kernel)(Params...), Args&&... args) {
  const std::tuple<Params...> params(std::forward<Args>(args)...);
  const long blocks = static_cast<long>(grid.x) * grid.y * grid.z;
  if (hooks.begin != nullptr) {
    int grid_stride = -1;
    std::apply(
        [&](const auto&... arg) {
          ((grid_stride = std::max(grid_stride, grid_stride_of(arg, blocks))), ...);
        },
        params);
    if (!hooks.begin(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes,
                     grid_stride)) {
      return;
    }
  }
  const int threads = static_cast<int>(block.x * block.y * block.z);
  std::unique_ptr<BlockSync> sync;
  std::barrier<> start(threads + 1);
  std::barrier<> done(threads + 1);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      linear_tid = t;
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      blockDim = block;
      gridDim = grid;
      for (long b = 0; b < blocks; ++b) {
        start.arrive_and_wait();
        current = sync.get();
        blockIdx =
            dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<long>(grid.x) * grid.y));
        in_kernel = true;
        std::apply(kernel, params);
        in_kernel = false;
        // An exited thread no longer takes part in barriers, as on the device.
        current->warps[t / 32]->arrive_and_drop();
        current->block.arrive_and_drop();
        done.arrive_and_wait();
      }
    });
  }
  for (long b = 0; b < blocks; ++b) {
    sync = std::make_unique<BlockSync>(threads);
    start.arrive_and_wait();
    done.arrive_and_wait();
  }
  for (auto& w : workers) {
    w.join();
  }
  if (hooks.end != nullptr) {
    hooks.end();
  }
}

}  // namespace emu

inline void __syncthreads() { emu::current->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  emu::current->warps[emu::linear_tid / 32]->arrive_and_wait();
}

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, int delta) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffled values are at most 8 bytes");
  auto& sync = *emu::current;
  const int lane = emu::linear_tid % 32;
  const int warp_base = emu::linear_tid - lane;
  std::uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  sync.exchange[emu::linear_tid] = slot;
  __syncwarp();
  T out = value;
  if (lane + delta < 32) {
    std::memcpy(&out, &sync.exchange[warp_base + lane + delta], sizeof(T));
  }
  __syncwarp();
  return out;
}

// The slice of the CUDA runtime and of c10/cuda the host code uses.
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrL2CacheSize,
  cudaDevAttrMaxThreadsPerMultiProcessor,
  cudaDevAttrMaxBlocksPerMultiprocessor,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor,
};
// An sm_90 device with CKBN_EMULATED_SMS multiprocessors and CKBN_EMULATED_L2_BYTES of L2.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = emu::multiprocessors();
      break;
    case cudaDevAttrL2CacheSize:
      *value = static_cast<int>(emu::l2_bytes());
      break;
    case cudaDevAttrMaxThreadsPerMultiProcessor:
      *value = 2048;
      break;
    case cudaDevAttrMaxBlocksPerMultiprocessor:
      *value = 32;
      break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = 228 * 1024;
      break;
  }
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// Resident blocks per multiprocessor: what the launch observer says (the sm_90 occupancy of the
// compiled kernel), else emu::blocks_per_multiprocessor().
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel kernel,
                                                          int block_threads,
                                                          std::size_t shared_bytes) {
  *blocks =
      emu::hooks.occupancy != nullptr
          ? emu::hooks.occupancy(reinterpret_cast<const void*>(kernel), block_threads, shared_bytes)
          : emu::blocks_per_multiprocessor();
  return cudaSuccess;
}
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated CUDA call failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
