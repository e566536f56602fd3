// Observes the emulated kernels (see emulation.h's hooks and traffic.py): records every launch and
// counts the bytes kernel threads read and write in tensor storage, the emulator's global memory.
//
// Counting: traffic.py compiles the emulated sources with -fsanitize=address in callback mode, so
// the compiler calls __asan_loadN/__asan_storeN before every memory access; they are defined here
// (no sanitizer runtime is linked) and count an access when a kernel thread makes it into a tensor
// allocated through the tracking CPU allocator below. Stack, shared memory and the emulator's own
// state are not tensor storage, so they are not counted.
//
// Per launch it keeps, for "large" allocations (at least the size the caller names, i.e. the
// full-size tensors) and the others (per-channel vectors, staging): bytes accessed (every load and
// store, as an L1 would see them) and distinct bytes touched (what DRAM would move if the caches
// held everything reused within the launch).
#include "emulation.h"

#include <c10/core/CPUAllocator.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>

#define CKBN_NOT_INSTRUMENTED __attribute__((no_sanitize_address, noinline))

namespace {

struct Range {
  std::uintptr_t begin;
  std::uintptr_t end;
  bool large;
  std::uint8_t* seen;  // per byte: 1 read, 2 written, during the current launch
};

// Counters of one launch, by [large][write]: accessed and distinct bytes.
struct Counts {
  long accessed[2][2];
  long distinct[2][2];
};

struct Launch {
  std::uintptr_t kernel_offset;  // kernel address minus the library's load address
  dim3 grid, block;
  long shared_bytes;
  int grid_stride;
  Counts counts;
  // Distinct bytes of the other allocations both written and read: a split reduction's partial
  // states and arrival counters, which its blocks store and its last blocks read back.
  long staging;
};

struct State {
  std::mutex mutex;
  std::map<std::uintptr_t, std::size_t> allocations;  // begin -> size, live tensor storage
  bool counting = false;
  bool plan_only = false;
  long large_bytes = 1;
  std::unordered_map<std::uintptr_t, int> occupancy;  // kernel offset -> blocks per SM
  std::vector<Launch> launches;
  // The current launch: a sorted snapshot of the allocations and its counters.
  std::vector<Range> ranges;
  std::vector<std::vector<std::uint8_t>> seen;
  Counts counts;
};

State& state() {
  static State s;
  return s;
}

std::uintptr_t library_offset(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) == 0) {
    return 0;
  }
  return reinterpret_cast<std::uintptr_t>(kernel) -
         reinterpret_cast<std::uintptr_t>(info.dli_fbase);
}

// The tensor range holding `address`, by binary search over the launch's snapshot.
CKBN_NOT_INSTRUMENTED Range* find_range(Range* ranges, long n, std::uintptr_t address) {
  long lo = 0, hi = n;
  while (lo < hi) {
    const long mid = (lo + hi) / 2;
    if (ranges[mid].end <= address) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < n && ranges[lo].begin <= address ? &ranges[lo] : nullptr;
}

CKBN_NOT_INSTRUMENTED void count_access(std::uintptr_t address, std::size_t size, int write) {
  if (!emu::in_kernel) {
    return;
  }
  emu::in_kernel = false;  // whatever runs below is not the kernel's
  State& s = state();
  if (s.counting) {
    Range* r = find_range(s.ranges.data(), static_cast<long>(s.ranges.size()), address);
    if (r != nullptr) {
      const std::uintptr_t end = std::min<std::uintptr_t>(address + size, r->end);
      const std::uint8_t bit = write ? 2 : 1;
      long fresh = 0;
      for (std::uintptr_t a = address; a < end; ++a) {
        const std::uint8_t old = __atomic_fetch_or(&r->seen[a - r->begin], bit, __ATOMIC_RELAXED);
        fresh += (old & bit) ? 0 : 1;
      }
      __atomic_fetch_add(&s.counts.accessed[r->large][write], static_cast<long>(end - address),
                         __ATOMIC_RELAXED);
      __atomic_fetch_add(&s.counts.distinct[r->large][write], fresh, __ATOMIC_RELAXED);
    }
  }
  emu::in_kernel = true;
}

bool on_launch_begin(const void* kernel, dim3 grid, dim3 block, std::size_t shared_bytes,
                     int grid_stride) {
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.mutex);
  s.launches.push_back(Launch{
      library_offset(kernel), grid, block, static_cast<long>(shared_bytes), grid_stride, {}, 0});
  s.ranges.clear();
  s.seen.clear();
  s.counts = Counts{};
  if (s.counting) {
    s.seen.reserve(s.allocations.size());
    for (const auto& [begin, size] : s.allocations) {
      s.seen.emplace_back(size, 0);
      s.ranges.push_back(Range{begin, begin + size, static_cast<long>(size) >= s.large_bytes,
                               s.seen.back().data()});
    }
  }
  return !s.plan_only;
}

void on_launch_end() {
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.mutex);
  if (!s.launches.empty()) {
    s.launches.back().counts = s.counts;
    long staging = 0;
    for (const Range& r : s.ranges) {
      if (!r.large) {
        staging += std::count(r.seen, r.seen + (r.end - r.begin), std::uint8_t{3});
      }
    }
    s.launches.back().staging = staging;
  }
}

int occupancy_of(const void* kernel, int, std::size_t) {
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.mutex);
  const auto it = s.occupancy.find(library_offset(kernel));
  return it != s.occupancy.end() ? it->second : emu::blocks_per_multiprocessor();
}

// Delegates to the CPU allocator it replaces and keeps the live allocations' ranges.
struct TrackingAllocator final : c10::Allocator {
  explicit TrackingAllocator(c10::Allocator* inner) : inner(inner) {}

  struct Context {
    c10::DataPtr inner;
    std::size_t size;
  };

  static void release(void* raw) {
    auto* context = static_cast<Context*>(raw);
    {
      State& s = state();
      const std::lock_guard<std::mutex> lock(s.mutex);
      s.allocations.erase(reinterpret_cast<std::uintptr_t>(context->inner.get()));
    }
    delete context;
  }

  c10::DataPtr allocate(std::size_t n) override {
    c10::DataPtr data = inner->allocate(n);
    void* ptr = data.get();
    if (ptr == nullptr || n == 0) {
      return data;
    }
    {
      State& s = state();
      const std::lock_guard<std::mutex> lock(s.mutex);
      s.allocations[reinterpret_cast<std::uintptr_t>(ptr)] = n;
    }
    auto* context = new Context{std::move(data), n};
    return c10::DataPtr(ptr, context, &release, c10::Device(c10::DeviceType::CPU));
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  c10::Allocator* inner;
};

const bool installed = [] {
  static TrackingAllocator tracker(c10::GetCPUAllocator());
  c10::SetCPUAllocator(&tracker, /*priority=*/200);
  emu::hooks.begin = &on_launch_begin;
  emu::hooks.end = &on_launch_end;
  emu::hooks.occupancy = &occupancy_of;
  return true;
}();

// Counting on or off; plan_only skips running kernels (launches are still recorded).
void configure(bool counting, bool plan_only, int64_t large_bytes) {
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.mutex);
  s.counting = counting;
  s.plan_only = plan_only;
  s.large_bytes = large_bytes;
  s.launches.clear();
}

void set_occupancy(std::vector<int64_t> kernel_offsets, std::vector<int64_t> blocks_per_sm) {
  TORCH_CHECK(kernel_offsets.size() == blocks_per_sm.size(), "one occupancy per kernel");
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.mutex);
  s.occupancy.clear();
  for (std::size_t i = 0; i < kernel_offsets.size(); ++i) {
    s.occupancy[static_cast<std::uintptr_t>(kernel_offsets[i])] =
        static_cast<int>(blocks_per_sm[i]);
  }
}

// The launches since the last call, 18 numbers each: kernel offset, grid xyz, block xyz, dynamic
// shared bytes, grid-stride (1, 0, -1: unknown), then accessed read/write and distinct read/write
// bytes of large allocations, then the same four of the others, then their staging bytes.
std::vector<int64_t> take_launches() {
  State& s = state();
  const std::lock_guard<std::mutex> lock(s.mutex);
  std::vector<int64_t> out;
  for (const Launch& l : s.launches) {
    for (const auto v : {l.kernel_offset, std::uintptr_t{l.grid.x}, std::uintptr_t{l.grid.y},
                         std::uintptr_t{l.grid.z}, std::uintptr_t{l.block.x},
                         std::uintptr_t{l.block.y}, std::uintptr_t{l.block.z}}) {
      out.push_back(static_cast<int64_t>(v));
    }
    out.push_back(l.shared_bytes);
    out.push_back(l.grid_stride);
    for (int large : {1, 0}) {
      out.insert(out.end(), {l.counts.accessed[large][0], l.counts.accessed[large][1],
                             l.counts.distinct[large][0], l.counts.distinct[large][1]});
    }
    out.push_back(l.staging);
  }
  s.launches.clear();
  return out;
}

}  // namespace

// The callbacks -fsanitize=address emits in callback mode, and the few entry points its module
// constructor calls; nothing else of the sanitizer is used.
extern "C" {
#define CKBN_ACCESS_CALLBACKS(n)                                                                   \
  CKBN_NOT_INSTRUMENTED void __asan_load##n(std::uintptr_t a) { count_access(a, n, 0); }           \
  CKBN_NOT_INSTRUMENTED void __asan_store##n(std::uintptr_t a) { count_access(a, n, 1); }          \
  CKBN_NOT_INSTRUMENTED void __asan_load##n##_noabort(std::uintptr_t a) { count_access(a, n, 0); } \
  CKBN_NOT_INSTRUMENTED void __asan_store##n##_noabort(std::uintptr_t a) { count_access(a, n, 1); }
CKBN_ACCESS_CALLBACKS(1)
CKBN_ACCESS_CALLBACKS(2)
CKBN_ACCESS_CALLBACKS(4)
CKBN_ACCESS_CALLBACKS(8)
CKBN_ACCESS_CALLBACKS(16)
#undef CKBN_ACCESS_CALLBACKS
CKBN_NOT_INSTRUMENTED void __asan_loadN(std::uintptr_t a, std::size_t n) { count_access(a, n, 0); }
CKBN_NOT_INSTRUMENTED void __asan_storeN(std::uintptr_t a, std::size_t n) { count_access(a, n, 1); }
CKBN_NOT_INSTRUMENTED void __asan_loadN_noabort(std::uintptr_t a, std::size_t n) {
  count_access(a, n, 0);
}
CKBN_NOT_INSTRUMENTED void __asan_storeN_noabort(std::uintptr_t a, std::size_t n) {
  count_access(a, n, 1);
}
CKBN_NOT_INSTRUMENTED void __asan_init() {}
CKBN_NOT_INSTRUMENTED void __asan_version_mismatch_check_v8() {}
CKBN_NOT_INSTRUMENTED void __asan_handle_no_return() {}
CKBN_NOT_INSTRUMENTED void __asan_before_dynamic_init(const char*) {}
CKBN_NOT_INSTRUMENTED void __asan_after_dynamic_init() {}
}

TORCH_LIBRARY(ckbn_emulation, m) {
  m.def("configure(bool counting, bool plan_only, int large_bytes) -> ()", &configure);
  m.def("set_occupancy(int[] kernel_offsets, int[] blocks_per_sm) -> ()", &set_occupancy);
  m.def("take_launches() -> int[]", &take_launches);
}
