// The CPU loops of every ckbn op, on at::vec::Vectorized<acc_t>. Included once by each
// kernels_*.cpp, which names the table it defines (CKBN_KERNELS) and may set CKBN_TARGET (a GCC
// target string) and CPU_CAPABILITY first: the
// headers before the target pragma below stay generic, so that the inline functions they define,
// which the linker shares between the copies, run on every CPU; only the vector headers and the
// loops take the target. Everything here but the table has internal linkage.
//
// Two loop shapes serve both layouts of kernel_view:
//   ChannelPlanes [N][C][HW]: each (n, c) plane is a contiguous run of one channel, whose
//     coefficients are scalars broadcast into vectors. Reductions run per channel, in parallel.
//   ChannelsLast [rows][C]: per-channel values are arrays read with vector loads. Reductions split
//     the rows between threads; each keeps per-channel partial results, merged at the end.
// The arithmetic is batch_norm_math.h's, evaluated on vector lanes and on scalars for tails.
// Statistics are two-pass moments of cache-sized chunks, merged with Chan's formula.
#include "ckbn.h"
#include "cpu/kernels.h"
#include "batch_norm_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef CKBN_TARGET
#define CKBN_STRINGIFY(x) #x
#define CKBN_PRAGMA(x) _Pragma(CKBN_STRINGIFY(x))
CKBN_PRAGMA(GCC target(CKBN_TARGET))
// g++ (unlike gcc) leaves __AVX__ and the like undefined after a target pragma, and sleef.h, which
// the vector headers include, declares its AVX functions only under them.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#endif
#if defined(CPU_CAPABILITY_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace ckbn {
namespace math {

// Activations (batch_norm_math.h) on vector lanes: a comparison gives a mask vector, blendv selects
// by it.
template <typename T>
struct Lanes<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V select(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
  // ATen's faster exp (within 20 ulp for float; for double, Sleef's 1-ulp exp), as torch's own CPU
  // softmax uses: SiLU's exp dominates its fused passes, and its error is far below the tests'.
  static V exp(const V& a) { return a.exp_u20(); }
};

}  // namespace math

namespace cpu {
namespace {

using math::Activation;
using math::BackwardCoeffs;
using math::NormalizeCoeffs;
using math::Welford;

// Elements in one two-pass moments chunk: 16 KiB of float, so the second pass reads from L1.
constexpr int64_t kChunk = 4096;
// Fewest elements in one run of a ChannelsLast element pass (a few vector blocks; its per-channel
// coefficient columns, tiled to its width, stay in L1).
constexpr int64_t kElementRun = 512;
// Input bytes an element pass takes first to last before it steps back (for_each_run).
constexpr int64_t kReverseSpan = 256 * 1024;
// Fewest rows in a ChannelsLast chunk, so that merging its C results costs little per element.
constexpr int64_t kMinChunkRows = 16;

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Stores the vector v at p: with `streaming`, non-temporally where p is aligned to the vector's
// size, as the streaming instructions require (cached elsewhere, and in the default build).
template <typename V, typename T>
C10_ALWAYS_INLINE void store_vector(T* p, const V& v, bool streaming) {
  const bool aligned = reinterpret_cast<std::uintptr_t>(p) % sizeof(V) == 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (sizeof(V) == 64) {
    if (streaming && aligned) {
      __m512i bits;
      std::memcpy(&bits, &v, sizeof(bits));
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bits);
      return;
    }
  }
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (sizeof(V) == 32) {
    if (streaming && aligned) {
      __m256i bits;
      std::memcpy(&bits, &v, sizeof(bits));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
      return;
    }
  }
#endif
  (void)aligned;
  (void)streaming;
  v.store(p);
}

// Orders this thread's streaming stores before what follows (the end of a parallel chunk): they
// are weakly ordered, unlike cached stores.
C10_ALWAYS_INLINE void streaming_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// kVecs vectors of acc_t, loaded from or stored to scalar_t memory (half and bfloat16 widen to
// float). Four independent vectors per step hide the latency of dependent adds.
template <typename scalar_t>
struct Block {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int kVecs = 4;
  static constexpr int64_t kSize = kVecs * Vec::size();
  using Vecs = std::array<Vec, kVecs>;

  static Vecs zeros() {
    Vecs v;
    v.fill(Vec(acc_t(0)));
    return v;
  }

  static Vecs load(const scalar_t* p) {
    Vecs v;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int k = 0; k < kVecs; ++k) {
        v[k] = Vec::loadu(p + k * Vec::size());
      }
    } else {
      for (int k = 0; k < kVecs; k += 2) {
        at::vec::load_to_float(p + k * Vec::size(), v[k], v[k + 1]);
      }
    }
    return v;
  }

  // `streaming`: see streams_output (kernels.h).
  static void store(scalar_t* p, const Vecs& v, bool streaming) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      for (int k = 0; k < kVecs; ++k) {
        store_vector(p + k * Vec::size(), v[k], streaming);
      }
    } else {
      for (int k = 0; k < kVecs; k += 2) {
        store_vector(p + k * Vec::size(), at::vec::convert_from_float<scalar_t>(v[k], v[k + 1]),
                     streaming);
      }
    }
  }

  static acc_t sum_lanes(const Vecs& v) {
    static_assert(kVecs == 4);
    __at_align__ acc_t lanes[Vec::size()];
    ((v[0] + v[1]) + (v[2] + v[3])).store(lanes);
    acc_t sum = 0;
    for (int64_t l = 0; l < Vec::size(); ++l) {
      sum += lanes[l];
    }
    return sum;
  }
};

// Visits x[0, n): block_op(i, Vecs) for each whole block, element_op(i, acc_t) for each element of
// the tail; i is the index of the first element visited.
template <typename scalar_t, typename BlockOp, typename ElementOp>
C10_ALWAYS_INLINE void for_blocks(const scalar_t* x, int64_t n, const BlockOp& block_op,
                                  const ElementOp& element_op) {
  using B = Block<scalar_t>;
  int64_t i = 0;
  for (; i + B::kSize <= n; i += B::kSize) {
    block_op(i, B::load(x + i));
  }
  for (; i < n; ++i) {
    element_op(i, static_cast<acc_type<scalar_t>>(x[i]));
  }
}

// Adds v to the acc_t accumulators at p.
template <typename Vec, typename acc_t>
C10_ALWAYS_INLINE void accumulate(acc_t* p, const Vec& v) {
  (Vec::loadu(p) + v).store(p);
}

// ChannelsLast rows taken `rows` at a time, so that a group spans whole vector blocks even when a
// row is shorter than a block. Per-channel arrays are tiled to `width` slots: slot s holds channel
// s % channels, whatever row the group starts at.
struct RowGroups {
  int64_t channels;
  int64_t rows;
  int64_t width;
};

RowGroups row_groups(int64_t channels, int64_t block) {
  if (channels % block == 0 || channels >= 4 * block) {
    return {channels, 1, channels};
  }
  const int64_t width = std::lcm(channels, block);
  return {channels, width / channels, width};
}

// Each channel's value in each of its slots.
template <typename acc_t>
void tile(const acc_t* per_channel, const RowGroups& g, acc_t* slots) {
  for (int64_t r = 0; r < g.rows; ++r) {
    std::copy(per_channel, per_channel + g.channels, slots + r * g.channels);
  }
}

// Each channel's total over its slots.
template <typename acc_t>
void fold(const acc_t* slots, const RowGroups& g, acc_t* per_channel) {
  std::copy(slots, slots + g.channels, per_channel);
  for (int64_t r = 1; r < g.rows; ++r) {
    for (int64_t c = 0; c < g.channels; ++c) {
      per_channel[c] += slots[r * g.channels + c];
    }
  }
}

// Adds rows [begin, end) of ChannelsLast data into kAcc arrays of per-slot sums, one vector block
// of slots at a time so that its accumulators stay in registers down the rows:
//   block_op(acc, i, offset) adds the terms of slots i .. i + kSize, element `offset` on, to acc;
//   element_op(s, offset) adds the terms of one element, of slot s, to the arrays directly (for
//   slots past the last whole block, and for a last row group cut short by `end`).
template <typename scalar_t, size_t kAcc, typename BlockOp, typename ElementOp>
void reduce_columns(const RowGroups& groups, int64_t begin, int64_t end,
                    const std::array<acc_type<scalar_t>*, kAcc>& slots, const BlockOp& block_op,
                    const ElementOp& element_op) {
  using B = Block<scalar_t>;
  using Vec = typename B::Vec;
  const int64_t whole_groups = (end - begin) / groups.rows;
  const int64_t first = begin * groups.channels;
  int64_t i = 0;
  for (; i + B::kSize <= groups.width; i += B::kSize) {
    std::array<typename B::Vecs, kAcc> acc;
    acc.fill(B::zeros());
    for (int64_t r = 0; r < whole_groups; ++r) {
      block_op(acc, i, first + r * groups.width + i);
    }
    for (size_t a = 0; a < kAcc; ++a) {
      for (int k = 0; k < B::kVecs; ++k) {
        accumulate(slots[a] + i + k * Vec::size(), acc[a][k]);
      }
    }
  }
  for (; i < groups.width; ++i) {
    for (int64_t r = 0; r < whole_groups; ++r) {
      element_op(i, first + r * groups.width + i);
    }
  }
  const int64_t cut_short = (end - begin - whole_groups * groups.rows) * groups.channels;
  for (int64_t s = 0; s < cut_short; ++s) {
    element_op(s, first + whole_groups * groups.width + s);
  }
}

// Rows of a ChannelsLast reduction chunk: at least kChunk elements, whole row groups.
int64_t chunk_rows(const RowGroups& g) {
  const int64_t rows = std::max(kMinChunkRows, at::divup(kChunk, g.channels));
  return at::divup(rows, g.rows) * g.rows;
}

// How many row ranges a ChannelsLast reduction splits into: one per thread, each worth a thread.
int64_t row_blocks(const Geometry& g) {
  const int64_t by_work = at::divup(g.rows() * g.channels, at::internal::GRAIN_SIZE);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_work));
}

// Calls chunk(block, begin, end) for consecutive chunks of at most `rows_per_chunk` rows of each of
// `blocks` equal row ranges, the ranges in parallel.
template <typename Fn>
void parallel_row_chunks(int64_t rows, int64_t blocks, int64_t rows_per_chunk, const Fn& chunk) {
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t end = rows * (b + 1) / blocks;
      for (int64_t r = rows * b / blocks; r < end; r += rows_per_chunk) {
        chunk(b, r, std::min(end, r + rows_per_chunk));
      }
    }
  });
}

// Parallel grain, in channels or planes, for units of `unit` elements.
int64_t grain(int64_t unit) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, unit));
}

// A per-channel tensor as acc_t values, whatever its dtype and stride.
template <typename acc_t>
std::vector<acc_t> channel_values(const at::Tensor& t) {
  const at::Tensor values = t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = values.const_data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + values.numel());
}

// An optional affine parameter as acc_t values; `fill` when absent.
template <typename acc_t>
std::vector<acc_t> channel_values(const c10::optional<at::Tensor>& t, acc_t fill,
                                  int64_t channels) {
  if (t.has_value() && t->defined()) {
    return channel_values<acc_t>(*t);
  }
  return std::vector<acc_t>(channels, fill);
}

// ---------------------------------------------------------------------------------------------
// Per-channel coefficients (batch_norm_math.h's structs) as an element pass sees them.

// The fields of batch_norm_math.h's coefficient structs, so that Broadcast and Columns serve every
// struct.
template <typename T>
C10_ALWAYS_INLINE std::array<T, 3> fields(const NormalizeCoeffs<T>& c) {
  return {c.mean, c.scale, c.shift};
}

template <typename T>
C10_ALWAYS_INLINE std::array<T, 5> fields(const BackwardCoeffs<T>& c) {
  return {c.mean, c.mean_dy, c.projection, c.scale, c.shift};
}

template <template <typename> class Coeffs, typename T, size_t n, size_t... j>
C10_ALWAYS_INLINE Coeffs<T> from_fields(const std::array<T, n>& f, std::index_sequence<j...>) {
  return Coeffs<T>{f[j]...};
}

template <template <typename> class Coeffs, typename T, size_t n>
C10_ALWAYS_INLINE Coeffs<T> from_fields(const std::array<T, n>& f) {
  return from_fields<Coeffs>(f, std::make_index_sequence<n>());
}

// One channel's coefficients for every element of a plane: get<Vec>(i) gives them broadcast.
template <template <typename> class Coeffs, typename acc_t>
struct Broadcast {
  using Vec = at::vec::Vectorized<acc_t>;
  Coeffs<acc_t> scalar;
  Coeffs<Vec> vec;

  explicit Broadcast(const Coeffs<acc_t>& c) : scalar(c), vec(splat(c)) {}

  static Coeffs<Vec> splat(const Coeffs<acc_t>& c) {
    const auto f = fields(c);
    std::array<Vec, std::tuple_size_v<decltype(f)>> out;
    for (size_t j = 0; j < f.size(); ++j) {
      out[j] = Vec(f[j]);
    }
    return from_fields<Coeffs>(out);
  }

  template <typename T>
  C10_ALWAYS_INLINE const Coeffs<T>& get(int64_t) const {
    if constexpr (std::is_same_v<T, acc_t>) {
      return scalar;
    } else {
      return vec;
    }
  }
};

// Coefficients of the slots of a ChannelsLast row group, one array per field: get<Vec>(i) loads
// slots i .. i + Vec::size().
template <template <typename> class Coeffs, typename acc_t>
struct Columns {
  static constexpr size_t kFields =
      std::tuple_size_v<decltype(fields(std::declval<Coeffs<acc_t>>()))>;
  std::array<std::vector<acc_t>, kFields> columns;

  Columns(const std::vector<Coeffs<acc_t>>& per_channel, const RowGroups& g) {
    for (auto& column : columns) {
      column.resize(g.width);
    }
    for (int64_t s = 0; s < g.width; ++s) {
      const auto f = fields(per_channel[s % g.channels]);
      for (size_t j = 0; j < kFields; ++j) {
        columns[j][s] = f[j];
      }
    }
  }

  template <typename T>
  C10_ALWAYS_INLINE Coeffs<T> get(int64_t i) const {
    std::array<T, kFields> out;
    for (size_t j = 0; j < kFields; ++j) {
      if constexpr (std::is_same_v<T, acc_t>) {
        out[j] = columns[j][i];
      } else {
        out[j] = T::loadu(columns[j].data() + i);
      }
    }
    return from_fields<Coeffs>(out);
  }
};

// An element pass over the whole input: run(offset, len, coeffs) for every plane (ChannelPlanes)
// or row group (ChannelsLast), coeffs.get<T>(i) giving the coefficients of element offset + i.
// Each thread takes its runs in spans of about kReverseSpan bytes of input, last span first (and
// first to last within a span, for the prefetcher): what read the input before (batch_stats, the
// backward's reduction, the layer that wrote it) went first to last, so the input's end is what
// the cache still holds, and the output's start is what it keeps for the next reader.
template <typename Fn>
void for_each_run_backwards(int64_t begin, int64_t end, int64_t run_bytes, const Fn& fn) {
  const int64_t span = std::max<int64_t>(1, kReverseSpan / std::max<int64_t>(run_bytes, 1));
  for (int64_t last = end; last > begin; last -= span) {
    for (int64_t i = std::max(begin, last - span); i < last; ++i) {
      fn(i);
    }
  }
}

template <typename scalar_t, template <typename> class Coeffs, typename Run>
void for_each_run(const Geometry& g, const std::vector<Coeffs<acc_type<scalar_t>>>& per_channel,
                  const Run& run) {
  using acc_t = acc_type<scalar_t>;
  if (g.layout == Layout::ChannelPlanes) {
    at::parallel_for(0, g.batch * g.channels, grain(g.spatial), [&](int64_t begin, int64_t end) {
      for_each_run_backwards(begin, end, g.spatial * int64_t(sizeof(scalar_t)), [&](int64_t plane) {
        run(plane * g.spatial, g.spatial,
            Broadcast<Coeffs, acc_t>(per_channel[plane % g.channels]));
      });
      streaming_fence();
    });
    return;
  }
  // Groups of at least kElementRun elements: a run of a few blocks costs its setup per block.
  RowGroups groups = row_groups(g.channels, Block<scalar_t>::kSize);
  const int64_t repeat = at::divup(kElementRun, groups.width);
  groups.rows *= repeat;
  groups.width *= repeat;
  const Columns<Coeffs, acc_t> columns(per_channel, groups);
  at::parallel_for(
      0, at::divup(g.rows(), groups.rows), grain(groups.width), [&](int64_t begin, int64_t end) {
        for_each_run_backwards(
            begin, end, groups.width * int64_t(sizeof(scalar_t)), [&](int64_t group) {
              const int64_t row = group * groups.rows;
              run(row * g.channels, std::min(groups.rows, g.rows() - row) * g.channels, columns);
            });
        streaming_fence();
      });
}

// ---------------------------------------------------------------------------------------------
// batch_stats

// Moments of `segments` runs of `len` elements, `stride` apart: a first pass gives an approximate
// mean, a second the deviations from it, both over data still in cache.
template <typename scalar_t>
Welford<acc_type<scalar_t>> chunk_moments(const scalar_t* x, int64_t segments, int64_t stride,
                                          int64_t len) {
  using B = Block<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  auto sum = B::zeros();
  acc_t sum_tail = 0;
  for (int64_t s = 0; s < segments; ++s) {
    for_blocks(
        x + s * stride, len,
        [&](int64_t, const typename B::Vecs& v) {
          for (int k = 0; k < B::kVecs; ++k) {
            sum[k] += v[k];
          }
        },
        [&](int64_t, acc_t v) { sum_tail += v; });
  }
  const int64_t count = segments * len;
  const acc_t shift = (B::sum_lanes(sum) + sum_tail) / static_cast<acc_t>(count);
  const Vec shift_vec(shift);
  auto sum_d = B::zeros();
  auto sum_d2 = B::zeros();
  acc_t sum_d_tail = 0;
  acc_t sum_d2_tail = 0;
  for (int64_t s = 0; s < segments; ++s) {
    for_blocks(
        x + s * stride, len,
        [&](int64_t, const typename B::Vecs& v) {
          for (int k = 0; k < B::kVecs; ++k) {
            const Vec d = v[k] - shift_vec;
            sum_d[k] += d;
            sum_d2[k] = at::vec::fmadd(d, d, sum_d2[k]);
          }
        },
        [&](int64_t, acc_t v) {
          const acc_t d = v - shift;
          sum_d_tail += d;
          sum_d2_tail += d * d;
        });
  }
  return math::welford_from_shifted_sums(count, shift, B::sum_lanes(sum_d) + sum_d_tail,
                                         B::sum_lanes(sum_d2) + sum_d2_tail);
}

// Per-channel moments of ChannelPlanes input, channels in parallel. A chunk is a piece of one plane
// when planes are large, or several whole planes when they are small.
template <typename scalar_t>
std::vector<Welford<acc_type<scalar_t>>> plane_moments(const scalar_t* x, const Geometry& g) {
  using acc_t = acc_type<scalar_t>;
  std::vector<Welford<acc_t>> moments(g.channels, math::welford_empty<acc_t>());
  if (g.per_channel() == 0) {
    return moments;
  }
  const int64_t plane_stride = g.channels * g.spatial;
  at::parallel_for(0, g.channels, grain(g.per_channel()), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      auto w = math::welford_empty<acc_t>();
      const scalar_t* channel = x + c * g.spatial;
      if (g.spatial >= kChunk) {
        for (int64_t n = 0; n < g.batch; ++n) {
          for (int64_t offset = 0; offset < g.spatial; offset += kChunk) {
            const int64_t len = std::min(kChunk, g.spatial - offset);
            w = math::welford_merge(w,
                                    chunk_moments(channel + n * plane_stride + offset, 1, 0, len));
          }
        }
      } else {
        const int64_t planes_per_chunk = kChunk / g.spatial;
        for (int64_t n = 0; n < g.batch; n += planes_per_chunk) {
          const int64_t planes = std::min(planes_per_chunk, g.batch - n);
          w = math::welford_merge(
              w, chunk_moments(channel + n * plane_stride, planes, plane_stride, g.spatial));
        }
      }
      moments[c] = w;
    }
  });
  return moments;
}

// Per-channel moments of ChannelsLast input: each row range keeps one Welford per channel, merged
// chunk by chunk, then the ranges are merged in order.
template <typename scalar_t>
std::vector<Welford<acc_type<scalar_t>>> row_moments(const scalar_t* x, const Geometry& g) {
  using B = Block<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  const RowGroups groups = row_groups(g.channels, B::kSize);
  const int64_t blocks = row_blocks(g);
  std::vector<Welford<acc_t>> partial(blocks * g.channels, math::welford_empty<acc_t>());
  // Per range: three slot arrays and three per-channel arrays.
  const int64_t scratch_size = 3 * (groups.width + g.channels);
  std::vector<acc_t> scratch(blocks * scratch_size);

  parallel_row_chunks(
      g.rows(), blocks, chunk_rows(groups), [&](int64_t b, int64_t begin, int64_t end) {
        acc_t* slot_sum = scratch.data() + b * scratch_size;  // first-pass sums, then the shift
        acc_t* slot_d = slot_sum + groups.width;
        acc_t* slot_d2 = slot_d + groups.width;
        acc_t* shift = slot_d2 + groups.width;
        acc_t* sum_d = shift + g.channels;
        acc_t* sum_d2 = sum_d + g.channels;
        std::fill(slot_sum, slot_sum + 3 * groups.width, acc_t(0));
        reduce_columns<scalar_t, 1>(
            groups, begin, end, {slot_sum},
            [&](auto& acc, int64_t, int64_t offset) {
              const auto v = B::load(x + offset);
              for (int k = 0; k < B::kVecs; ++k) {
                acc[0][k] += v[k];
              }
            },
            [&](int64_t s, int64_t offset) { slot_sum[s] += static_cast<acc_t>(x[offset]); });
        fold(slot_sum, groups, shift);
        for (int64_t c = 0; c < g.channels; ++c) {
          shift[c] /= static_cast<acc_t>(end - begin);
        }
        tile(shift, groups, slot_sum);
        reduce_columns<scalar_t, 2>(
            groups, begin, end, {slot_d, slot_d2},
            [&](auto& acc, int64_t i, int64_t offset) {
              const auto v = B::load(x + offset);
              for (int k = 0; k < B::kVecs; ++k) {
                const Vec d = v[k] - Vec::loadu(slot_sum + i + k * Vec::size());
                acc[0][k] += d;
                acc[1][k] = at::vec::fmadd(d, d, acc[1][k]);
              }
            },
            [&](int64_t s, int64_t offset) {
              const acc_t d = static_cast<acc_t>(x[offset]) - slot_sum[s];
              slot_d[s] += d;
              slot_d2[s] += d * d;
            });
        fold(slot_d, groups, sum_d);
        fold(slot_d2, groups, sum_d2);
        for (int64_t c = 0; c < g.channels; ++c) {
          auto& w = partial[b * g.channels + c];
          w = math::welford_merge(
              w, math::welford_from_shifted_sums(end - begin, shift[c], sum_d[c], sum_d2[c]));
        }
      });

  std::vector<Welford<acc_t>> moments(partial.begin(), partial.begin() + g.channels);
  for (int64_t b = 1; b < blocks; ++b) {
    for (int64_t c = 0; c < g.channels; ++c) {
      moments[c] = math::welford_merge(moments[c], partial[b * g.channels + c]);
    }
  }
  return moments;
}

// ---------------------------------------------------------------------------------------------
// normalize

// Whether the element passes with `act` wait on memory rather than on arithmetic, so that
// streaming stores speed them up. SiLU's exp makes its passes slower than memory, and streaming
// their output measured slower than caching it (bench/ops.py, normalize and backward).
template <Activation act>
constexpr bool bound_by_memory() {
  return act != Activation::Silu;
}

template <Activation act, typename scalar_t>
void normalize_kernel(const scalar_t* x, scalar_t* y, const Geometry& g,
                      const std::vector<NormalizeCoeffs<acc_type<scalar_t>>>& coeffs,
                      acc_type<scalar_t> slope, bool streaming) {
  using B = Block<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  const Vec slope_vec(slope);
  for_each_run<scalar_t>(g, coeffs, [&](int64_t offset, int64_t len, const auto& c) {
    const scalar_t* in = x + offset;
    scalar_t* out = y + offset;
    for_blocks(
        in, len,
        [&](int64_t i, typename B::Vecs v) {
          for (int k = 0; k < B::kVecs; ++k) {
            v[k] = math::normalize_activate<act>(v[k], c.template get<Vec>(i + k * Vec::size()),
                                                 slope_vec);
          }
          B::store(out + i, v, streaming);
        },
        [&](int64_t i, acc_t v) {
          out[i] = static_cast<scalar_t>(
              math::normalize_activate<act>(v, c.template get<acc_t>(i), slope));
        });
  });
}

// ---------------------------------------------------------------------------------------------
// backward

// Per-channel sum(dy) and sum(dy * (x - mean)).
template <typename acc_t>
struct GradSums {
  std::vector<acc_t> dy;
  std::vector<acc_t> dy_xmu;
};

// The sums over channel c of ChannelPlanes input; each plane's lanes are added up before the next
// plane's, which keeps rounding error from growing with the batch. `z` gives back a fused
// activation's input (only its mean is read without one). With `dz`, the gradient through the
// activation is stored there as well (stores_activation_grad).
template <Activation act, typename scalar_t>
std::pair<acc_type<scalar_t>, acc_type<scalar_t>> plane_grad_sums(
    const scalar_t* dy, const scalar_t* x, const Geometry& g, int64_t c,
    const NormalizeCoeffs<acc_type<scalar_t>>& z, acc_type<scalar_t> slope, scalar_t* dz) {
  using B = Block<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  const acc_t mean = z.mean;
  const Vec mean_vec(mean);
  const auto z_vec = Broadcast<NormalizeCoeffs, acc_t>::splat(z);
  const Vec slope_vec(slope);
  acc_t sum_dy = 0;
  acc_t sum_dy_xmu = 0;
  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t offset = (n * g.channels + c) * g.spatial;
    const scalar_t* dy_plane = dy + offset;
    scalar_t* dz_plane = dz == nullptr ? nullptr : dz + offset;
    auto plane_dy = B::zeros();
    auto plane_dy_xmu = B::zeros();
    for_blocks(
        x + offset, g.spatial,
        [&](int64_t i, const typename B::Vecs& v) {
          auto d = B::load(dy_plane + i);
          for (int k = 0; k < B::kVecs; ++k) {
            d[k] = math::pre_activation_grad<act>(d[k], v[k], z_vec, slope_vec);
            plane_dy[k] += d[k];
            plane_dy_xmu[k] = at::vec::fmadd(d[k], v[k] - mean_vec, plane_dy_xmu[k]);
          }
          if (dz_plane != nullptr) {
            B::store(dz_plane + i, d, false);  // read back at once, from the cache
          }
        },
        [&](int64_t i, acc_t v) {
          const acc_t d =
              math::pre_activation_grad<act>(static_cast<acc_t>(dy_plane[i]), v, z, slope);
          if (dz_plane != nullptr) {
            dz_plane[i] = static_cast<scalar_t>(d);
          }
          sum_dy += d;
          sum_dy_xmu += d * (v - mean);
        });
    sum_dy += B::sum_lanes(plane_dy);
    sum_dy_xmu += B::sum_lanes(plane_dy_xmu);
  }
  return {sum_dy, sum_dy_xmu};
}

// The sums over every channel of ChannelsLast input: slot sums per chunk, added to the row range's
// per-channel totals, which are added up in order at the end. With `dz`, as plane_grad_sums.
template <Activation act, typename scalar_t>
GradSums<acc_type<scalar_t>> row_grad_sums(
    const scalar_t* dy, const scalar_t* x, const Geometry& g,
    const std::vector<NormalizeCoeffs<acc_type<scalar_t>>>& z, acc_type<scalar_t> slope,
    scalar_t* dz, bool streaming) {
  using B = Block<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  const RowGroups groups = row_groups(g.channels, B::kSize);
  const Columns<NormalizeCoeffs, acc_t> slot_z(z, groups);
  const acc_t* slot_mean = slot_z.columns[0].data();
  const Vec slope_vec(slope);
  const int64_t blocks = row_blocks(g);
  // Per range: the per-channel totals of dy and dy_xmu, then two slot arrays and two per-channel
  // arrays for the chunk.
  const int64_t scratch_size = 4 * g.channels + 2 * groups.width;
  std::vector<acc_t> scratch(blocks * scratch_size, acc_t(0));

  parallel_row_chunks(
      g.rows(), blocks, chunk_rows(groups), [&](int64_t b, int64_t begin, int64_t end) {
        acc_t* total_dy = scratch.data() + b * scratch_size;
        acc_t* total_dy_xmu = total_dy + g.channels;
        acc_t* chunk_dy = total_dy_xmu + g.channels;
        acc_t* chunk_dy_xmu = chunk_dy + g.channels;
        acc_t* slot_dy = chunk_dy_xmu + g.channels;
        acc_t* slot_dy_xmu = slot_dy + groups.width;
        std::fill(slot_dy, slot_dy + 2 * groups.width, acc_t(0));
        reduce_columns<scalar_t, 2>(
            groups, begin, end, {slot_dy, slot_dy_xmu},
            [&](auto& acc, int64_t i, int64_t offset) {
              const auto v = B::load(x + offset);
              auto d = B::load(dy + offset);
              for (int k = 0; k < B::kVecs; ++k) {
                const int64_t slot = i + k * Vec::size();
                if constexpr (act != Activation::Identity) {
                  d[k] = math::pre_activation_grad<act>(d[k], v[k], slot_z.template get<Vec>(slot),
                                                        slope_vec);
                }
                acc[0][k] += d[k];
                acc[1][k] = at::vec::fmadd(d[k], v[k] - Vec::loadu(slot_mean + slot), acc[1][k]);
              }
              if (dz != nullptr) {
                B::store(dz + offset, d, streaming);
              }
            },
            [&](int64_t s, int64_t offset) {
              const acc_t d = math::pre_activation_grad<act>(static_cast<acc_t>(dy[offset]),
                                                             static_cast<acc_t>(x[offset]),
                                                             slot_z.template get<acc_t>(s), slope);
              if (dz != nullptr) {
                dz[offset] = static_cast<scalar_t>(d);
              }
              slot_dy[s] += d;
              slot_dy_xmu[s] += d * (static_cast<acc_t>(x[offset]) - slot_mean[s]);
            });
        fold(slot_dy, groups, chunk_dy);
        fold(slot_dy_xmu, groups, chunk_dy_xmu);
        for (int64_t c = 0; c < g.channels; ++c) {
          total_dy[c] += chunk_dy[c];
          total_dy_xmu[c] += chunk_dy_xmu[c];
        }
        streaming_fence();
      });

  GradSums<acc_t> sums{std::vector<acc_t>(g.channels, acc_t(0)),
                       std::vector<acc_t>(g.channels, acc_t(0))};
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t c = 0; c < g.channels; ++c) {
      sums.dy[c] += scratch[b * scratch_size + c];
      sums.dy_xmu[c] += scratch[b * scratch_size + g.channels + c];
    }
  }
  return sums;
}

// grad_input of one run (a plane or a row group) from `offset`, by math::fused_backward_element.
template <Activation act, typename scalar_t, typename CoeffsAt>
C10_ALWAYS_INLINE void grad_input_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx,
                                      int64_t offset, int64_t len, const CoeffsAt& c,
                                      acc_type<scalar_t> slope, bool streaming) {
  using B = Block<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  const Vec slope_vec(slope);
  const scalar_t* dy_run = dy + offset;
  scalar_t* dx_run = dx + offset;
  for_blocks(
      x + offset, len,
      [&](int64_t i, const typename B::Vecs& v) {
        auto d = B::load(dy_run + i);
        for (int k = 0; k < B::kVecs; ++k) {
          d[k] = math::fused_backward_element<act>(
              d[k], v[k], c.template get<Vec>(i + k * Vec::size()), slope_vec);
        }
        B::store(dx_run + i, d, streaming);
      },
      [&](int64_t i, acc_t v) {
        dx_run[i] = static_cast<scalar_t>(math::fused_backward_element<act>(
            static_cast<acc_t>(dy_run[i]), v, c.template get<acc_t>(i), slope));
      });
}

// grad_input of the whole input, from per-channel coefficients.
template <Activation act, typename scalar_t>
void grad_input_pass(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                     const std::vector<BackwardCoeffs<acc_type<scalar_t>>>& coeffs,
                     acc_type<scalar_t> slope, bool streaming) {
  for_each_run<scalar_t>(g, coeffs, [&](int64_t offset, int64_t len, const auto& c) {
    grad_input_run<act>(dy, x, dx, offset, len, c, slope, streaming);
  });
}

// The per-channel inputs of the backward, as acc_t values.
// invstd, weight and bias are needed for grad_input, and for the sums of a fused activation.
template <typename acc_t>
struct ChannelParams {
  std::vector<acc_t> mean;
  std::vector<acc_t> invstd;
  std::vector<acc_t> weight;
  std::vector<acc_t> bias;
  acc_t slope;
};

template <typename acc_t>
BackwardCoeffs<acc_t> channel_backward_coeffs(const ChannelParams<acc_t>& p, int64_t c,
                                              acc_t sum_dy, acc_t sum_dy_xmu, int64_t count,
                                              bool train) {
  const acc_t n = static_cast<acc_t>(std::max<int64_t>(count, 1));
  return math::backward_coeffs(p.mean[c], p.invstd[c], p.weight[c], sum_dy / n, sum_dy_xmu / n,
                               train, p.bias[c]);
}

// Whether the backward stores dz = dy * act'(z) while it reduces, for the element pass to read back
// instead of computing it again: worth a pass over memory for SiLU, whose derivative costs an exp
// and a division, and exact only when dz keeps its acc_t precision in scalar_t.
template <Activation act, typename scalar_t>
constexpr bool stores_activation_grad() {
  return act == Activation::Silu && std::is_same_v<scalar_t, acc_type<scalar_t>>;
}

// The backward of one batch: the sums (when `sums` is given) and grad_input (when `dx` is). For
// ChannelPlanes both happen channel by channel, so the element pass reads what the reduction just
// brought into cache.
template <Activation act, typename scalar_t>
void backward_kernel(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                     const ChannelParams<acc_type<scalar_t>>& params, bool train,
                     GradSums<acc_type<scalar_t>>* sums) {
  using acc_t = acc_type<scalar_t>;
  const int64_t count = g.per_channel();
  // grad_input's pass reads dy and x and writes dx.
  const bool streaming = dx != nullptr && bound_by_memory<act>() &&
                         streams_output(3 * g.rows() * g.channels * int64_t(sizeof(scalar_t)));
  // dz, the gradient through the activation, goes to dx's buffer during the reduction when the
  // element pass is to read it back rather than compute it again.
  scalar_t* dz = stores_activation_grad<act, scalar_t>() && sums != nullptr ? dx : nullptr;
  const acc_t slope = params.slope;
  // Without an activation the sums read only the mean (backward_reduce has no invstd).
  const auto pre_activation = [&](int64_t c) {
    return act == Activation::Identity ? NormalizeCoeffs<acc_t>{params.mean[c], acc_t(1), acc_t(0)}
                                       : math::normalize_coeffs(params.mean[c], params.invstd[c],
                                                                params.weight[c], params.bias[c]);
  };
  if (g.layout == Layout::ChannelPlanes) {
    at::parallel_for(0, g.channels, grain(2 * count), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        acc_t sum_dy = 0;
        acc_t sum_dy_xmu = 0;
        if (sums != nullptr) {
          std::tie(sum_dy, sum_dy_xmu) =
              plane_grad_sums<act>(dy, x, g, c, pre_activation(c), slope, dz);
          sums->dy[c] = sum_dy;
          sums->dy_xmu[c] = sum_dy_xmu;
        }
        if (dx != nullptr) {
          const Broadcast<BackwardCoeffs, acc_t> coeffs(
              channel_backward_coeffs(params, c, sum_dy, sum_dy_xmu, count, train));
          for (int64_t n = 0; n < g.batch; ++n) {
            const int64_t offset = (n * g.channels + c) * g.spatial;
            if (dz != nullptr) {
              grad_input_run<Activation::Identity>(dz, x, dx, offset, g.spatial, coeffs, slope,
                                                   streaming);
            } else {
              grad_input_run<act>(dy, x, dx, offset, g.spatial, coeffs, slope, streaming);
            }
          }
        }
      }
      streaming_fence();
    });
    return;
  }
  if (sums != nullptr) {
    std::vector<NormalizeCoeffs<acc_t>> z(g.channels);
    for (int64_t c = 0; c < g.channels; ++c) {
      z[c] = pre_activation(c);
    }
    *sums = row_grad_sums<act>(dy, x, g, z, slope, dz, streaming);
  }
  if (dx != nullptr) {
    std::vector<BackwardCoeffs<acc_t>> coeffs(g.channels);
    for (int64_t c = 0; c < g.channels; ++c) {
      coeffs[c] =
          sums != nullptr
              ? channel_backward_coeffs(params, c, sums->dy[c], sums->dy_xmu[c], count, train)
              : channel_backward_coeffs(params, c, acc_t(0), acc_t(0), count, train);
    }
    if (dz != nullptr) {
      grad_input_pass<Activation::Identity>(dz, x, dx, g, coeffs, slope, streaming);
    } else {
      grad_input_pass<act>(dy, x, dx, g, coeffs, slope, streaming);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points: dtype dispatch around the loops above.

template <typename acc_t>
void write_channels(const std::vector<acc_t>& values, const at::Tensor& out) {
  std::copy(values.begin(), values.end(), out.mutable_data_ptr<acc_t>());
}

void batch_stats(const at::Tensor& x, const Geometry& g, double eps, const at::Tensor& mean,
                 const at::Tensor& invstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "ckbn::batch_stats", [&] {
        using acc_t = acc_type<scalar_t>;
        const scalar_t* data = x.const_data_ptr<scalar_t>();
        const auto moments =
            g.layout == Layout::ChannelPlanes ? plane_moments(data, g) : row_moments(data, g);
        acc_t* means = mean.mutable_data_ptr<acc_t>();
        acc_t* invstds = invstd.mutable_data_ptr<acc_t>();
        for (int64_t c = 0; c < g.channels; ++c) {
          means[c] = moments[c].mean;
          invstds[c] =
              math::invstd_from_var(math::welford_biased_var(moments[c]), static_cast<acc_t>(eps));
        }
      });
}

void normalize(const at::Tensor& x, const Geometry& g, const at::Tensor& mean,
               const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
               const c10::optional<at::Tensor>& bias, const Fused& fused,
               const at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "ckbn::normalize", [&] {
        using acc_t = acc_type<scalar_t>;
        const auto means = channel_values<acc_t>(mean);
        const auto invstds = channel_values<acc_t>(invstd);
        const auto weights = channel_values<acc_t>(weight, acc_t(1), g.channels);
        const auto biases = channel_values<acc_t>(bias, acc_t(0), g.channels);
        std::vector<NormalizeCoeffs<acc_t>> coeffs(g.channels);
        for (int64_t c = 0; c < g.channels; ++c) {
          coeffs[c] = math::normalize_coeffs(means[c], invstds[c], weights[c], biases[c]);
        }
        math::visit_activation(fused.activation, [&](auto act) {
          constexpr Activation activation = decltype(act)::value;
          normalize_kernel<activation>(
              x.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), g, coeffs,
              static_cast<acc_t>(fused.param),
              bound_by_memory<activation>() && streams_output(2 * int64_t(x.nbytes())));
        });
      });
}

void backward(const at::Tensor& dy, const at::Tensor& x, const Geometry& g, const at::Tensor& mean,
              const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
              const c10::optional<at::Tensor>& bias, const Fused& fused, bool train,
              const at::Tensor& grad_input, const at::Tensor& sum_dy,
              const at::Tensor& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ckbn::backward", [&] {
    using acc_t = acc_type<scalar_t>;
    // invstd, weight and bias serve grad_input and a fused activation only; backward_reduce
    // passes an undefined invstd.
    const bool need_params = grad_input.defined() || fused.activation != Activation::Identity;
    const auto params_or_empty = [&](auto values) {
      return need_params ? values() : std::vector<acc_t>();
    };
    const ChannelParams<acc_t> params{
        channel_values<acc_t>(mean), params_or_empty([&] { return channel_values<acc_t>(invstd); }),
        params_or_empty([&] { return channel_values<acc_t>(weight, acc_t(1), g.channels); }),
        params_or_empty([&] { return channel_values<acc_t>(bias, acc_t(0), g.channels); }),
        static_cast<acc_t>(fused.param)};
    GradSums<acc_t> sums{std::vector<acc_t>(g.channels, acc_t(0)),
                         std::vector<acc_t>(g.channels, acc_t(0))};
    math::visit_activation(fused.activation, [&](auto act) {
      backward_kernel<decltype(act)::value>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          grad_input.defined() ? grad_input.mutable_data_ptr<scalar_t>() : nullptr, g, params,
          train, sum_dy.defined() ? &sums : nullptr);
    });
    if (sum_dy.defined()) {
      write_channels(sums.dy, sum_dy);
      write_channels(sums.dy_xmu, sum_dy_xmu);
    }
  });
}

void backward_elemt(const at::Tensor& dy, const at::Tensor& x, const Geometry& g,
                    const at::Tensor& mean, const at::Tensor& invstd,
                    const c10::optional<at::Tensor>& weight, const at::Tensor& mean_dy,
                    const at::Tensor& mean_dy_xmu, const at::Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "ckbn::backward_elemt", [&] {
        using acc_t = acc_type<scalar_t>;
        const auto means = channel_values<acc_t>(mean);
        const auto invstds = channel_values<acc_t>(invstd);
        const auto weights = channel_values<acc_t>(weight, acc_t(1), g.channels);
        const auto mean_dys = channel_values<acc_t>(mean_dy);
        const auto mean_dy_xmus = channel_values<acc_t>(mean_dy_xmu);
        std::vector<BackwardCoeffs<acc_t>> coeffs(g.channels);
        for (int64_t c = 0; c < g.channels; ++c) {
          coeffs[c] = math::backward_coeffs(means[c], invstds[c], weights[c], mean_dys[c],
                                            mean_dy_xmus[c], true);
        }
        grad_input_pass<Activation::Identity>(dy.const_data_ptr<scalar_t>(),
                                              x.const_data_ptr<scalar_t>(),
                                              grad_input.mutable_data_ptr<scalar_t>(), g, coeffs,
                                              acc_t(0), streams_output(3 * int64_t(x.nbytes())));
      });
}

}  // namespace

// kernels_default(), kernels_avx2() or kernels_avx512(), as the including file names it.
const Kernels& CKBN_KERNELS() {
  static constexpr Kernels kernels{&batch_stats, &normalize, &backward, &backward_elemt};
  return kernels;
}

}  // namespace cpu
}  // namespace ckbn
