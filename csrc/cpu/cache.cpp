// When an element pass writes its output with streaming (non-temporal) stores: kernels.h.
#include "cpu/kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

namespace ckbn {
namespace cpu {
namespace {

// A cache that a pass fills: its size, and how many CPUs share it. A negative size: none known,
// and nothing streams.
struct Cache {
  int64_t bytes = -1;
  int64_t cpus = 1;
};

// "32768K", "2M", "1048576": bytes, or -1.
int64_t parse_size(const std::string& text) {
  size_t end = 0;
  int64_t value = -1;
  try {
    value = std::stoll(text, &end);
  } catch (...) {
    return -1;
  }
  const std::string unit = text.substr(end);
  const int64_t scale = unit.empty()  ? 1
                        : unit == "K" ? 1 << 10
                        : unit == "M" ? 1 << 20
                        : unit == "G" ? 1 << 30
                                      : -1;
  return value < 0 || scale < 0 ? -1 : value * scale;
}

// "0-7,16-23": 16.
int64_t count_cpus(const std::string& list) {
  int64_t count = 0;
  size_t start = 0;
  while (start < list.size()) {
    const size_t comma = std::min(list.find(',', start), list.size());
    const std::string range = list.substr(start, comma - start);
    const size_t dash = range.find('-');
    try {
      count += dash == std::string::npos
                   ? 1
                   : std::stoll(range.substr(dash + 1)) - std::stoll(range) + 1;
    } catch (...) {
      return 1;
    }
    start = comma + 1;
  }
  return std::max<int64_t>(count, 1);
}

// The last-level data cache of CPU 0 as Linux describes it in sysfs: one instance, and the CPUs
// that share it. (sysconf's figure is no substitute: on some CPUs it sums every instance.)
Cache last_level_cache() {
  Cache found;
  int deepest = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir =
        "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size"),
        shared_file(dir + "shared_cpu_list");
    int level = 0;
    std::string type, size, shared;
    if (!(level_file >> level) || !(type_file >> type) || !(size_file >> size) ||
        type == "Instruction" || level < deepest) {
      continue;
    }
    deepest = level;
    found.bytes = parse_size(size);
    found.cpus = (shared_file >> shared) ? count_cpus(shared) : 1;
  }
  return found;
}

// CKBN_CPU_STREAMING_BYTES, when set to a size, replaces the cache as a per-thread threshold: 0
// streams every output, which the tests use to reach these stores with small tensors.
Cache cache_to_fill() {
  if (const char* text = std::getenv("CKBN_CPU_STREAMING_BYTES")) {
    const int64_t bytes = parse_size(text);
    if (bytes >= 0) {
      return Cache{bytes, 1};
    }
  }
  return last_level_cache();
}

}  // namespace

bool streams_output(int64_t bytes_moved) {
  static const Cache cache = cache_to_fill();
  if (cache.bytes < 0) {
    return false;
  }
  // Each thread moves its share; the threads that share one cache instance fill it together.
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  return bytes_moved / threads * std::min(threads, cache.cpus) >= cache.bytes;
}

}  // namespace cpu
}  // namespace ckbn
