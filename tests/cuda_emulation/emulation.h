// Runs CUDA kernels on the host: each CUDA thread of a block is a fiber (a ucontext with its own
// stack) on the launching thread, blocks run one at a time, __syncthreads and __syncwarp suspend a
// fiber until its block (or warp) has arrived, and warp shuffles go through a per-warp buffer.
//
// It exists so that the kernels of csrc/cuda can be executed and compared with the reference on a
// machine without a GPU: their index arithmetic, block merges, split reductions and vector paths
// run exactly as written. It says nothing about performance. Fibers run one at a time, each until
// it waits at a barrier or returns, so a missing barrier may still give the right numbers here:
// ThreadSanitizer (below) is what judges the ordering.
//
// What a GPU would refuse or leave undefined, it reports:
// - Barriers: the threads of a block that have not returned must meet each __syncthreads at the
//   same call site (a warp's lanes, each __syncwarp and shuffle); a mismatch fails the launch
//   naming both sites, and threads waiting at barriers that can never pair (a block barrier
//   against a warp barrier) fail it naming where each thread waits, instead of hanging.
// - Shared memory: build.py turns every `__shared__ T name;` into a reference to storage of the
//   running block (emu::shared_variable), allocated to its exact size when the block starts it and
//   filled with CKBN_EMULATED_SHARED_FILL bytes (0xFF: a NaN in every floating type, -1 in every
//   integer), so a read of a slot no thread of the block wrote shows in the results instead of a
//   zero, the identity of every reduction; an access past its end is an AddressSanitizer report.
// - Launch limits of sm_80 and sm_90, the architectures built: block and grid dimensions, threads
//   per block against the kernel's __launch_bounds__ (build.py passes it), shared memory (static,
//   as declared, plus dynamic) within the 48 KiB a kernel gets without opting in.
// Built with -fsanitize=thread, each fiber is a ThreadSanitizer fiber and the barriers are its
// synchronization (blocks are ordered one after another: a race between blocks is not seen); built
// with -fsanitize=address,alignment,bounds, tensors are the heap allocations they are.
//
// Hooks let tests/cuda_emulation/traffic.cpp observe launches: it records each launch's kernel and
// shape, can skip running it (to read the launch plans of full-size shapes), and counts the bytes
// kernel threads read and write in tensor storage (`in_kernel` tells its counters who is running).
#pragma once

#include <ATen/ATen.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <source_location>
#include <string>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
// Exported by the ThreadSanitizer runtime, not declared by its header: while a thread ignores,
// its reads and writes are neither checked nor recorded (synchronization still counts).
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace emu {

inline long env_or(const char* name, long fallback) {
  const char* env = std::getenv(name);
  return env != nullptr ? std::strtol(env, nullptr, 0) : fallback;
}

// What the emulated device reports, which sets the launch plans (CKBN_EMULATED_*): multiprocessors,
// resident blocks of every kernel per multiprocessor unless the launch observer says, and L2 bytes
// (small, so that both the fused and the two-kernel backward run).
inline int multiprocessors() { return static_cast<int>(env_or("CKBN_EMULATED_SMS", 4)); }
inline int blocks_per_multiprocessor() {
  return static_cast<int>(env_or("CKBN_EMULATED_BLOCKS_PER_SM", 2));
}
inline long l2_bytes() { return env_or("CKBN_EMULATED_L2_BYTES", 256 << 10); }

// CUDA's launch limits on sm_80 and sm_90.
constexpr unsigned long kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned long kMaxGridDim[3] = {2147483647ul, 65535, 65535};
// Static plus dynamic shared memory of a block, unless the kernel opts in to more with
// cudaFuncSetAttribute (ckbn's never do).
constexpr std::size_t kMaxSharedBytes = 48 * 1024;

// ThreadSanitizer's view. The emulator's own bookkeeping (fiber states, thread indices, shared
// storage it allocates and fills) is hidden from it: only the kernels' accesses are checked, and
// they are ordered by what orders them on a GPU, the barriers (and the launch order of blocks).
#if defined(__SANITIZE_THREAD__)
struct HiddenFromTsan {
  HiddenFromTsan() { __tsan_ignore_thread_begin(); }
  ~HiddenFromTsan() { __tsan_ignore_thread_end(); }
};
inline void tsan_release(void* address) { __tsan_release(address); }
inline void tsan_acquire(void* address) { __tsan_acquire(address); }
#else
struct HiddenFromTsan {};
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
#endif

// A barrier call site.
struct Site {
  const char* file = "";
  unsigned line = 0;
  const char* what = "";

  bool same(const Site& other) const {
    return line == other.line && (file == other.file || std::strcmp(file, other.file) == 0) &&
           std::strcmp(what, other.what) == 0;
  }
  std::string describe() const {
    return std::string(what) + " at " + file + ":" + std::to_string(line);
  }
};

enum class FiberState { Runnable, AtBlockBarrier, AtWarpBarrier, Returned };

struct Fiber {
  ucontext_t context;
  void* stack = nullptr;
  FiberState state = FiberState::Returned;
  Site site;
#if defined(__SANITIZE_THREAD__)
  void* tsan = nullptr;
#endif
};

struct SharedVariable {
  const void* key;
  void* data;
  std::size_t bytes;
};

// The block being run: its shared memory and the buffers of its shuffles, fresh for every block.
struct Block {
  explicit Block(int threads) : exchange(threads), warp_sync((threads + 31) / 32) {}
  ~Block() {
    HiddenFromTsan hidden;
    for (const SharedVariable& v : shared) {
      ::operator delete(v.data, std::align_val_t{16});
    }
  }
  std::vector<std::uint64_t> exchange;  // one slot per thread for shuffles
  std::vector<SharedVariable> shared;
  std::size_t shared_bytes = 0;
  // What ThreadSanitizer synchronizes the barriers on.
  char block_sync = 0;
  std::vector<char> warp_sync;
};

inline int shared_fill() {
  static const int fill = static_cast<int>(env_or("CKBN_EMULATED_SHARED_FILL", 0xFF));
  return fill;
}

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

// What a GPU checks before it runs a launch (cudaErrorInvalidConfiguration and kin).
inline void check_launch(const char* kernel, unsigned long max_threads, dim3 grid, dim3 block,
                         std::size_t dynamic_shared) {
  const unsigned block_dims[3] = {block.x, block.y, block.z};
  const unsigned grid_dims[3] = {grid.x, grid.y, grid.z};
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(block_dims[d] >= 1 && block_dims[d] <= kMaxBlockDim[d], "launch of ", kernel,
                ": block dimension ", "xyz"[d], " is ", block_dims[d], ", CUDA allows 1 to ",
                kMaxBlockDim[d]);
    TORCH_CHECK(grid_dims[d] >= 1 && grid_dims[d] <= kMaxGridDim[d], "launch of ", kernel,
                ": grid dimension ", "xyz"[d], " is ", grid_dims[d], ", CUDA allows 1 to ",
                kMaxGridDim[d]);
  }
  const unsigned long threads = static_cast<unsigned long>(block.x) * block.y * block.z;
  TORCH_CHECK(threads <= std::min(max_threads, kMaxThreadsPerBlock), "launch of ", kernel, ": ",
              threads, " threads per block, more than ",
              max_threads < kMaxThreadsPerBlock ? "its __launch_bounds__ of " : "CUDA's ",
              std::min(max_threads, kMaxThreadsPerBlock));
  TORCH_CHECK(dynamic_shared <= kMaxSharedBytes, "launch of ", kernel, ": ", dynamic_shared,
              " bytes of dynamic shared memory, more than ", kMaxSharedBytes);
}

// Runs the blocks of a launch on fibers of the launching thread. The fibers and their stacks are
// made once and reused; one launch at a time (launch() holds the lock).
class Scheduler {
 public:
  // Runs body on blockDim fibers for each block of the grid, one block at a time.
  void run(const char* kernel, dim3 grid, dim3 block, std::size_t dynamic_shared,
           const std::function<void()>& body) {
    const int threads = static_cast<int>(block.x * block.y * block.z);
    grow(threads);
#if defined(__SANITIZE_THREAD__)
    {
      HiddenFromTsan hidden;
      launching_tsan_ = __tsan_get_current_fiber();
    }
#endif
    const long blocks = static_cast<long>(grid.x) * grid.y * grid.z;
    for (long b = 0; b < blocks; ++b) {
      Block state(threads);
      std::string error;
      {
        HiddenFromTsan hidden;
        block_ = &state;
        body_ = &body;
        threads_ = threads;
        blockDim = block;
        gridDim = grid;
        blockIdx =
            dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<long>(grid.x) * grid.y));
        for (int t = 0; t < threads; ++t) {
          start(t);
        }
      }
      error = run_block();
      if (!error.empty()) {
        discard_fibers(threads);
      }
      tsan_acquire(&block_end_);
      {
        HiddenFromTsan hidden;
        block_ = nullptr;
      }
      TORCH_CHECK(error.empty(), "launch of ", kernel, ", block ", b, ": ", error);
      TORCH_CHECK(state.shared_bytes + dynamic_shared <= kMaxSharedBytes, "launch of ", kernel,
                  ": ", state.shared_bytes + dynamic_shared,
                  " bytes of shared memory (static and dynamic), more than ", kMaxSharedBytes);
    }
  }

  // On a fiber: wait at a barrier of the block (or of the fiber's warp) until all of it arrives.
  void wait(bool warp, const std::source_location& at, const char* what) {
    const int me = running_;
    void* sync = warp ? static_cast<void*>(&block_->warp_sync[me / 32]) : &block_->block_sync;
    {
      HiddenFromTsan hidden;
      fibers_[me]->site = Site{at.file_name(), at.line(), what};
      fibers_[me]->state = warp ? FiberState::AtWarpBarrier : FiberState::AtBlockBarrier;
    }
    tsan_release(sync);
    suspend(me);
    tsan_acquire(sync);
  }

  // On a fiber: the running block's storage for the __shared__ declaration `key`, made (to its
  // exact size, poisoned) by the first thread that reaches it.
  void* shared_variable(const void* key, std::size_t bytes) {
    HiddenFromTsan hidden;
    for (const SharedVariable& v : block_->shared) {
      if (v.key == key) {
        return v.data;
      }
    }
    void* data = ::operator new(bytes, std::align_val_t{16});
    std::memset(data, shared_fill(), bytes);
    block_->shared.push_back({key, data, bytes});
    block_->shared_bytes += bytes;
    return data;
  }

  std::vector<std::uint64_t>& exchange() { return block_->exchange; }

 private:
  static constexpr std::size_t kStackBytes = 256 << 10;

  void grow(int threads) {
    HiddenFromTsan hidden;
    while (static_cast<int>(fibers_.size()) < threads) {
      fibers_.push_back(std::make_unique<Fiber>());
      Fiber& f = *fibers_.back();
      // A guard page below each stack: an overflow faults instead of corrupting its neighbour.
      const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
      char* region = static_cast<char*>(mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
      TORCH_CHECK(region != MAP_FAILED, "emulator: no memory for a fiber stack");
      mprotect(region, page, PROT_NONE);
      f.stack = region + page;
#if defined(__SANITIZE_THREAD__)
      f.tsan = __tsan_create_fiber(0);
#endif
    }
  }

  // A fresh context for fiber t at the start of a block.
  void start(int t) {
    Fiber& f = *fibers_[t];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;  // entry() never returns
    makecontext(&f.context, &Scheduler::entry, 0);
    f.state = FiberState::Runnable;
    f.site = Site{};
  }

  // After a block that failed: its fibers were abandoned mid-kernel, so ThreadSanitizer's record
  // of their calls is dropped with them.
  void discard_fibers(int threads) {
#if defined(__SANITIZE_THREAD__)
    HiddenFromTsan hidden;
    for (int t = 0; t < threads; ++t) {
      if (fibers_[t]->state != FiberState::Returned) {
        __tsan_destroy_fiber(fibers_[t]->tsan);
        fibers_[t]->tsan = __tsan_create_fiber(0);
      }
    }
#else
    (void)threads;
#endif
  }

  static void entry();

  // Runs fiber t until it waits at a barrier or returns.
  void resume(int t, bool first) {
    {
      HiddenFromTsan hidden;
      running_ = t;
      linear_tid = t;
      threadIdx =
          dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
      in_kernel = true;
    }
#if defined(__SANITIZE_THREAD__)
    // Its first run in a block is ordered after what the launching thread did (the host wrote the
    // inputs, the blocks before ended); later runs are ordered by nothing but the barriers.
    __tsan_switch_to_fiber(fibers_[t]->tsan, first ? 0 : __tsan_switch_to_fiber_no_sync);
#else
    (void)first;
#endif
    swapcontext(&scheduler_context_, &fibers_[t]->context);
    HiddenFromTsan hidden;
    in_kernel = false;
  }

  // On fiber `me`: back to the scheduler until resumed.
  void suspend(int me) {
#if defined(__SANITIZE_THREAD__)
    __tsan_switch_to_fiber(launching_tsan_, __tsan_switch_to_fiber_no_sync);
#endif
    swapcontext(&fibers_[me]->context, &scheduler_context_);
  }

  // Runs the fibers of a block to completion; returns an error ("" if none).
  std::string run_block() {
    std::vector<char> started(threads_, 0);
    for (;;) {
      HiddenFromTsan hidden;
      bool progressed = false;
      for (int t = 0; t < threads_; ++t) {
        if (fibers_[t]->state == FiberState::Runnable) {
          resume(t, !started[t]);
          started[t] = 1;
          progressed = true;
        }
      }
      std::string error;
      for (int w = 0; w * 32 < threads_; ++w) {
        progressed |= release_if_all_wait(32 * w, std::min(threads_, 32 * w + 32),
                                          FiberState::AtWarpBarrier, error);
      }
      progressed |= release_if_all_wait(0, threads_, FiberState::AtBlockBarrier, error);
      if (!error.empty()) {
        return error;
      }
      if (std::all_of(fibers_.begin(), fibers_.begin() + threads_,
                      [](const auto& f) { return f->state == FiberState::Returned; })) {
        return "";
      }
      if (!progressed) {
        return deadlock();
      }
    }
  }

  // Releases threads [first, last) from a barrier of kind `at` if every one of them that has not
  // returned waits there (and at least one does); a mismatch of call sites is an error.
  bool release_if_all_wait(int first, int last, FiberState at, std::string& error) {
    int reference = -1;
    for (int t = first; t < last; ++t) {
      const Fiber& f = *fibers_[t];
      if (f.state == FiberState::Returned) {
        continue;  // returned: on sm_70 and later, exited threads no longer count at a barrier
      }
      if (f.state != at) {
        return false;
      }
      if (reference < 0) {
        reference = t;
      } else if (!f.site.same(fibers_[reference]->site) && error.empty()) {
        error = "threads of one block met at different barriers: thread " +
                std::to_string(reference) + " waits at " + fibers_[reference]->site.describe() +
                ", thread " + std::to_string(t) + " at " + f.site.describe();
      }
    }
    if (reference < 0) {
      return false;
    }
    for (int t = first; t < last; ++t) {
      if (fibers_[t]->state == at) {
        fibers_[t]->state = FiberState::Runnable;
      }
    }
    return true;
  }

  // No thread can run and no barrier can complete: where each thread waits, grouped.
  std::string deadlock() {
    std::string report = "threads wait at barriers that cannot pair (the block would hang):";
    int t = 0;
    while (t < threads_) {
      const Fiber& f = *fibers_[t];
      int last = t;
      while (last + 1 < threads_ && fibers_[last + 1]->state == f.state &&
             (f.state == FiberState::Returned || fibers_[last + 1]->site.same(f.site))) {
        ++last;
      }
      report += " threads " + std::to_string(t) + ".." + std::to_string(last) + " " +
                (f.state == FiberState::Returned ? std::string("returned") : f.site.describe()) +
                ";";
      t = last + 1;
    }
    // The waiting fibers are abandoned: the next block gives every fiber a fresh context.
    return report;
  }

  std::vector<std::unique_ptr<Fiber>> fibers_;
  ucontext_t scheduler_context_{};
  int threads_ = 0;
  int running_ = -1;
  Block* block_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  char block_end_ = 0;  // what ThreadSanitizer orders the end of a block on
#if defined(__SANITIZE_THREAD__)
  void* launching_tsan_ = nullptr;  // the launching thread, as ThreadSanitizer knows it
#endif
};

inline Scheduler& scheduler() {
  static auto* s = new Scheduler();  // never destroyed: fiber stacks stay mapped until exit
  return *s;
}

// Not instrumented: it never returns (the next block gives the fiber a fresh context), so an
// instrumented entry would leave a frame on ThreadSanitizer's record of the fiber's calls per
// block.
__attribute__((no_sanitize_thread)) inline void Scheduler::entry() {
  Scheduler& s = scheduler();
  s.body_->operator()();
  const int me = s.running_;
  s.fibers_[me]->state = FiberState::Returned;
  tsan_release(&s.block_end_);
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(s.launching_tsan_, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&s.fibers_[me]->context, &s.scheduler_context_);
}

// `__shared__ T name;` becomes `T& name = emu::shared_variable<T>(&key)` (build.py).
template <typename T>
T& shared_variable(const void* key) {
  return *static_cast<T*>(scheduler().shared_variable(key, sizeof(T)));
}

// One launch at a time: the fibers and the shared storage serve every launch.
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Runs kernel(args...) over the grid, after the checks a GPU makes of the launch. `kernel_name`
// and `max_threads` (its __launch_bounds__, else CUDA's limit) come from build.py's rewrite.
template <typename... Params, typename... Args>
void launch(const char* kernel_name, unsigned long max_threads, dim3 grid, dim3 block,
            std::size_t shared_bytes, void* /*stream*/, void (*kernel)(Params...), Args&&... args) {
  check_launch(kernel_name, max_threads, grid, block, shared_bytes);
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
  {
    std::lock_guard<std::mutex> lock(launch_mutex());
    scheduler().run(kernel_name, grid, block, shared_bytes, [&] { std::apply(kernel, params); });
  }
  if (hooks.end != nullptr) {
    hooks.end();
  }
}

}  // namespace emu

inline void __syncthreads(std::source_location at = std::source_location::current()) {
  emu::scheduler().wait(false, at, "__syncthreads");
}
inline void __syncwarp(unsigned = 0xffffffffu,
                       std::source_location at = std::source_location::current()) {
  emu::scheduler().wait(true, at, "__syncwarp");
}

// Blocks run one after another on one thread: every store is visible to the next block, and an
// atomic is a plain read-modify-write.
inline void __threadfence() {}
template <typename T>
T __ldcg(const T* address) {
  return *address;
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}
inline unsigned atomicExch(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = value;
  return old;
}

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, int delta, int /*width*/ = 32,
                   std::source_location at = std::source_location::current()) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffled values are at most 8 bytes");
  auto& exchange = emu::scheduler().exchange();
  const int lane = emu::linear_tid % 32;
  const int warp_base = emu::linear_tid - lane;
  std::uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  exchange[emu::linear_tid] = slot;
  emu::scheduler().wait(true, at, "__shfl_down_sync");
  T out = value;
  if (lane + delta < 32) {
    std::memcpy(&out, &exchange[warp_base + lane + delta], sizeof(T));
  }
  emu::scheduler().wait(true, at, "__shfl_down_sync");
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
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone, cudaStreamCaptureStatusActive };
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
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
