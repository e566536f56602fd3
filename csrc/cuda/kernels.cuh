// What the CUDA translation units of ckbn share: the element-wise operations and reductions, the
// kernels that run them, their launch from a plan (launch_plan.h), and operator argument handling.
//
// Kernels see input in one of the two layouts of ckbn.h:
//   ChannelPlanes [N][C][S]: a channel is a tile; its blocks walk planes, and S is contiguous, so
//     a warp reads along a plane.
//   ChannelsLast [rows][C]: a tile is a run of adjacent channels; its blocks walk rows, and a warp
//     reads adjacent channels of a row, which are contiguous.
// A launch is a list of units, each a tile or one split of a tile (when whole tiles would leave
// the GPU idle), taken by the blocks in a grid-stride loop. The blocks of a split reduction leave
// partial results in a staging buffer, and the last of a tile's blocks to finish merges them (one
// launch: no second kernel, whose fixed cost would dominate the small late layers).
//
// Two kinds of kernel cover the six operators:
//   reduce_*: per-channel reductions (Welford moments for batch_stats; sum(dy) and
//     sum(dy * (x - mean)) for the backward), optionally followed, when a unit holds a whole
//     channel, by the element-wise grad_input pass (fused backward);
//   elementwise_*: normalize and grad_input.
// Every formula comes from batch_norm_math.h; these files decide only which thread visits which
// element.
//
// Templates here are instantiated by the operator files, one op family per translation unit so
// that they compile in parallel: stats.cu (batch_stats), normalize.cu, backward.cu (the three
// backward operators, whose kernels are instantiated in grad_reduction.cu and
// grad_elementwise.cu), running_stats.cu (update_running_stats).
#pragma once

// Only Tensor's methods and the two factory functions used here, not all of ATen (ATen/ATen.h):
// nvcc parses every header once per architecture, so ATen's thousands of operator declarations
// would dominate the build. ATen's headers enforce the restriction.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "ckbn.h"
#include "launch_plan.h"
#include "batch_norm_math.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

namespace ckbn {
namespace gpu {

using plan::kThreads;
// Register budget: two blocks per multiprocessor (64 registers a thread).
constexpr int kMinBlocksPerSM = 2;
constexpr unsigned kFullWarp = 0xffffffffu;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

using plan::min_of;

// ---------------------------------------------------------------------------------------------
// Loads and stores of VEC adjacent elements, converted to and from the accumulation type.

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, VEC> load_raw(const scalar_t* data, int64_t offset) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(data + offset);
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void store_raw(scalar_t* data, int64_t offset,
                                          const Pack<scalar_t, VEC>& pack) {
  *reinterpret_cast<Pack<scalar_t, VEC>*>(data + offset) = pack;
}

// Lane v of a pack as acc_t. A bfloat16 lane is read through the 32-bit word it shares with its
// neighbour (its float is that word shifted or masked, exactly the conversion): a 16-bit lane
// extracted on its own would take a register from the load until its use.
template <typename acc_t, typename scalar_t, int VEC>
__device__ __forceinline__ acc_t lane_value(const Pack<scalar_t, VEC>& p, int v) {
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value && VEC % 2 == 0) {
    std::uint32_t word;
    std::memcpy(&word, &p.v[v - v % 2], sizeof(word));
    const std::uint32_t bits = v % 2 == 0 ? word << 16 : word & 0xffff0000u;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  } else {
    return static_cast<acc_t>(p.v[v]);
  }
}

// ---------------------------------------------------------------------------------------------
// Per-channel parameters.

// An optional per-channel vector in the input dtype or the statistics dtype (AMP keeps fp32
// parameters beside half input); `absent` stands in when there is none.
template <typename scalar_t, typename acc_t>
struct ChannelParam {
  const scalar_t* narrow;
  const acc_t* wide;
  acc_t absent;

  __device__ __forceinline__ acc_t operator[](int64_t c) const {
    return wide != nullptr ? wide[c] : narrow != nullptr ? static_cast<acc_t>(narrow[c]) : absent;
  }
};

// An optional per-channel output in either of those dtypes.
template <typename scalar_t, typename acc_t>
struct ChannelOutput {
  scalar_t* narrow;
  acc_t* wide;

  __device__ __forceinline__ bool active() const { return narrow != nullptr || wide != nullptr; }
  __device__ __forceinline__ void store(int64_t c, acc_t v) const {
    if (wide != nullptr) {
      wide[c] = v;
    } else if (narrow != nullptr) {
      narrow[c] = static_cast<scalar_t>(v);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Element-wise operations: a per-channel coefficient set, and the element formula of
// batch_norm_math.h.

// y = act((x - mean) * invstd * weight + bias).
template <typename scalar_t, typename acc_t_, math::Activation act = math::Activation::Identity>
struct NormalizeElementwise {
  using scalar_type = scalar_t;
  using acc_t = acc_t_;
  using Coeffs = math::NormalizeCoeffs<acc_t>;
  static constexpr int kInputs = 1;
  static constexpr plan::Kind kKind = plan::Kind::Elementwise;
  static constexpr int kCoeffFields = 3;  // of Coeffs, that apply reads

  const scalar_t* x;
  scalar_t* out;
  const acc_t* mean;
  const acc_t* invstd;
  ChannelParam<scalar_t, acc_t> weight;
  ChannelParam<scalar_t, acc_t> bias;
  acc_t slope;  // leaky_relu's negative slope

  __device__ __forceinline__ Coeffs coeffs(int64_t c) const {
    return math::normalize_coeffs(mean[c], invstd[c], weight[c], bias[c]);
  }
  __device__ __forceinline__ acc_t apply(acc_t x_value, acc_t /*dy*/, const Coeffs& co) const {
    return math::normalize_activate<act>(x_value, co, slope);
  }
};

// grad_input. In training mode it needs per-channel sum(dy) and sum(dy * (x - mean)) over the
// batch; `inv_count` turns the stored terms into the means batch_norm_math.h expects (1 / the
// element count when they are sums, 1 when the caller already passes means): a product, where a
// division would call a subroutine in every block. With a fused activation, dy is the gradient of
// its output; bias (with mean, invstd and weight) gives back its input.
template <typename scalar_t, typename acc_t_, math::Activation act = math::Activation::Identity>
struct BackwardElementwise {
  using scalar_type = scalar_t;
  using acc_t = acc_t_;
  using Coeffs = math::BackwardCoeffs<acc_t>;
  static constexpr int kInputs = 2;
  static constexpr plan::Kind kKind = plan::Kind::Elementwise;
  static constexpr int kCoeffFields = act == math::Activation::Identity ? 4 : 5;  // shift: z only

  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* out;
  const acc_t* mean;
  const acc_t* invstd;
  ChannelParam<scalar_t, acc_t> weight;
  const acc_t* dy_term;      // per channel; unused unless train
  const acc_t* dy_xmu_term;  // per channel; unused unless train
  acc_t inv_count;
  bool train;
  ChannelParam<scalar_t, acc_t> bias;  // read only with an activation
  acc_t slope;                         // leaky_relu's negative slope

  __device__ __forceinline__ Coeffs coeffs_from(int64_t c, acc_t sum_dy, acc_t sum_dy_xmu) const {
    return math::backward_coeffs(mean[c], invstd[c], weight[c], sum_dy * inv_count,
                                 sum_dy_xmu * inv_count, train,
                                 act == math::Activation::Identity ? acc_t(0) : bias[c]);
  }
  __device__ __forceinline__ Coeffs coeffs(int64_t c) const {
    return train ? coeffs_from(c, dy_term[c], dy_xmu_term[c]) : coeffs_from(c, acc_t(0), acc_t(0));
  }
  __device__ __forceinline__ acc_t apply(acc_t x_value, acc_t dy_value, const Coeffs& co) const {
    return math::fused_backward_element<act>(dy_value, x_value, co, slope);
  }
};

// ---------------------------------------------------------------------------------------------
// Reductions: a state per channel, how to add a chunk of one channel's elements to it, how to
// merge two states, and what to write once a channel is complete.

// The moments of K elements of one channel held in registers: two passes over registers, then one
// Welford merge per chunk instead of one division per element.
template <int K, typename acc_t>
__device__ __forceinline__ math::Welford<acc_t> chunk_moments(const acc_t* x) {
  acc_t sum = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    sum += x[k];
  }
  const acc_t mean = sum / static_cast<acc_t>(K);
  acc_t m2 = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const acc_t d = x[k] - mean;
    m2 += d * d;
  }
  return math::welford_from_moments<acc_t>(K, mean, m2);
}

struct NoChannelData {};

// Per-channel mean and invstd of the input.
template <typename scalar_t, typename acc_t_>
struct StatsReduction {
  using scalar_type = scalar_t;
  using acc_t = acc_t_;
  using State = math::Welford<acc_t>;
  using Channel = NoChannelData;
  static constexpr int kInputs = 1;
  static constexpr plan::Kind kKind = plan::Kind::Reduce;
  static constexpr int kChannelFields = 0;  // of Channel, that add reads
  static constexpr bool kFusable = false;

  const scalar_t* x;
  acc_t* mean;
  acc_t* invstd;
  acc_t eps;

  __device__ __forceinline__ Channel channel(int64_t) const { return {}; }
  __device__ __forceinline__ static State identity() { return math::welford_empty<acc_t>(); }
  __device__ __forceinline__ static State merge(const State& a, const State& b) {
    return math::welford_merge(a, b);
  }
  __device__ __forceinline__ static State shfl_down(const State& s, int delta) {
    State out;
    out.mean = __shfl_down_sync(kFullWarp, s.mean, delta);
    out.m2 = __shfl_down_sync(kFullWarp, s.m2, delta);
    out.count = __shfl_down_sync(kFullWarp, s.count, delta);
    return out;
  }
  // A partial state another block stored in this launch, read from L2 (see merge_partial_states).
  __device__ __forceinline__ static State load_partial(const State* p) {
    State out;
    out.mean = __ldcg(&p->mean);
    out.m2 = __ldcg(&p->m2);
    out.count = __ldcg(&p->count);
    return out;
  }
  template <int K>
  __device__ __forceinline__ void add(State& s, const acc_t* x_values, const acc_t*,
                                      Channel) const {
    if constexpr (K == 1) {
      s = math::welford_update(s, x_values[0]);
    } else {
      s = math::welford_merge(s, chunk_moments<K>(x_values));
    }
  }
  __device__ __forceinline__ void finish(int64_t c, const State& s) const {
    mean[c] = s.mean;
    invstd[c] = math::invstd_from_var(math::welford_biased_var(s), eps);
  }
};

template <typename acc_t>
struct GradSums {
  acc_t dy;
  acc_t dy_xmu;
};

// Per-channel sum(dy) and sum(dy * (x - mean)), and what the backward makes of them: grad_weight,
// grad_bias, and (fuse_input, when one block holds a whole channel) grad_input. With a fused
// activation the sums are of dz = dy * act'(z), z recomputed from x. The fused grad_input is its
// own instantiation: the reduction alone then holds none of its registers or shared memory.
template <typename scalar_t, typename acc_t_, math::Activation act = math::Activation::Identity,
          bool fuse_input = false>
struct GradReduction {
  using scalar_type = scalar_t;
  using acc_t = acc_t_;
  using State = GradSums<acc_t>;
  using Channel = math::NormalizeCoeffs<acc_t>;  // the channel's mean, and what gives back z
  static constexpr int kInputs = 2;
  static constexpr plan::Kind kKind = plan::Kind::Reduce;
  // Fields of Channel that add reads: the mean, and with an activation what gives back z.
  static constexpr int kChannelFields = act == math::Activation::Identity ? 1 : 3;
  static constexpr bool kFusable = fuse_input;

  const scalar_t* x;
  const scalar_t* dy;
  const acc_t* mean;
  const acc_t* invstd;  // needed for grad_weight only
  acc_t* sum_dy;        // optional outputs
  acc_t* sum_dy_xmu;
  ChannelOutput<scalar_t, acc_t> grad_weight;
  ChannelOutput<scalar_t, acc_t> grad_bias;
  BackwardElementwise<scalar_t, acc_t, act> element;  // element.out: the fused grad_input

  __device__ __forceinline__ static constexpr bool fused() { return fuse_input; }
  // The same reduction, writing grad_input (element.out) as it goes.
  GradReduction<scalar_t, acc_t, act, true> with_fused_input() const {
    return {x, dy, mean, invstd, sum_dy, sum_dy_xmu, grad_weight, grad_bias, element};
  }
  __device__ __forceinline__ Channel channel(int64_t c) const {
    if constexpr (act == math::Activation::Identity) {
      return Channel{mean[c], acc_t(1), acc_t(0)};  // backward_reduce has no invstd
    } else {
      return math::normalize_coeffs(mean[c], invstd[c], element.weight[c], element.bias[c]);
    }
  }
  __device__ __forceinline__ static State identity() { return State{acc_t(0), acc_t(0)}; }
  __device__ __forceinline__ static State merge(const State& a, const State& b) {
    return State{a.dy + b.dy, a.dy_xmu + b.dy_xmu};
  }
  __device__ __forceinline__ static State shfl_down(const State& s, int delta) {
    return State{__shfl_down_sync(kFullWarp, s.dy, delta),
                 __shfl_down_sync(kFullWarp, s.dy_xmu, delta)};
  }
  __device__ __forceinline__ static State load_partial(const State* p) {
    return State{__ldcg(&p->dy), __ldcg(&p->dy_xmu)};
  }
  template <int K>
  __device__ __forceinline__ void add(State& s, const acc_t* x_values, const acc_t* dy_values,
                                      const Channel& z) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t dz = math::pre_activation_grad<act>(dy_values[k], x_values[k], z, element.slope);
      s.dy += dz;
      s.dy_xmu += dz * (x_values[k] - z.mean);
    }
  }
  __device__ __forceinline__ void finish(int64_t c, const State& s) const {
    if (sum_dy != nullptr) {
      sum_dy[c] = s.dy;
    }
    if (sum_dy_xmu != nullptr) {
      sum_dy_xmu[c] = s.dy_xmu;
    }
    if (grad_weight.active()) {
      grad_weight.store(c, math::grad_weight_from_sums(s.dy_xmu, invstd[c]));
    }
    grad_bias.store(c, s.dy);
  }
  __device__ __forceinline__ typename BackwardElementwise<scalar_t, acc_t, act>::Coeffs
  element_coeffs(int64_t c, const State& s) const {
    return element.coeffs_from(c, s.dy, s.dy_xmu);
  }
};

// ---------------------------------------------------------------------------------------------
// Which elements a thread visits. A launch covers `units` units of work, taken by the blocks in
// turn (block b takes units b, b + gridDim.x, ...: a grid-stride loop when there are more units
// than blocks); unit u is split u / tiles of channel tile u % tiles.

// How far one grid stride (gridDim.x units) moves a block: `split` splits and `tile` tiles. The
// host computes it from the launch's grid, so that the walk holds no loop-invariant steps in
// registers through the kernel.
struct GridStep {
  unsigned tile;
  unsigned split;
};

// ChannelPlanes: one channel per tile; a split is a rectangle of batch_chunk planes x
// spatial_chunk elements.
struct PlaneTiling {
  int64_t batch;
  int64_t channels;  // tiles
  int64_t spatial;
  int64_t batch_chunk;
  int64_t spatial_chunk;   // a multiple of the vector width
  int64_t spatial_splits;  // rectangles along spatial for each batch chunk
  int64_t splits;          // units per channel
  int64_t units;           // channels * splits
  GridStep step;
};

// ChannelsLast: blockDim.x * VEC adjacent channels per tile; a split is row_chunk rows.
struct RowTiling {
  int64_t rows;
  int64_t channels;
  int64_t row_chunk;
  int64_t tiles;
  int64_t splits;  // units per tile
  int64_t units;   // tiles * splits
  GridStep step;
};

// A tile: ROWS rows (planes, or channels-last rows) of VEC adjacent elements; row k starts at
// element base + k * stride, and only the first `valid` rows exist.
struct Tile {
  int64_t base;
  int64_t stride;
  int valid;
};

// The units a block takes, blockIdx.x, blockIdx.x + gridDim.x, ..., as (tile, split): stepped
// with one division at the start rather than a 64-bit division (a subroutine call) per unit.
// tiles < 2^31 (checked on the host) and splits <= plan::kMaxSplits, so tile and split fit 32
// bits: the walk is live through the whole kernel, where every register counts at the cap of 64.
struct UnitWalk {
  int64_t unit;
  unsigned tile;
  unsigned split;

  __device__ __forceinline__ explicit UnitWalk(int64_t tiles)
      : unit(blockIdx.x),
        tile(blockIdx.x % static_cast<unsigned>(tiles)),
        split(blockIdx.x / static_cast<unsigned>(tiles)) {}
  __device__ __forceinline__ void next(int64_t tiles, const GridStep& step) {
    unit += gridDim.x;
    tile += step.tile;
    split += step.split;
    if (tile >= static_cast<unsigned>(tiles)) {
      tile -= static_cast<unsigned>(tiles);
      ++split;
    }
  }
};

// Calls f(tile) for each tile this thread owns in split `split` of channel c: ROWS planes x VEC
// elements.
template <int VEC, int ROWS, typename F>
__device__ __forceinline__ void visit_planes(const PlaneTiling& t, int64_t c, int64_t split,
                                             F&& f) {
  // Splits number at most plan::kMaxSplits: 32-bit divisions do.
  const auto split32 = static_cast<unsigned>(split);
  const auto spatial_splits32 = static_cast<unsigned>(t.spatial_splits);
  const int64_t batch_block = split32 / spatial_splits32;
  const int64_t spatial_block = split32 % spatial_splits32;
  const int64_t n_end = min_of(t.batch, (batch_block + 1) * t.batch_chunk);
  const int64_t s_begin = spatial_block * t.spatial_chunk;
  const int64_t s_end = min_of(t.spatial, s_begin + t.spatial_chunk);
  const int64_t row_step = blockDim.y;
  const int64_t plane_stride = row_step * t.channels * t.spatial;
  for (int64_t n = batch_block * t.batch_chunk + threadIdx.y; n < n_end; n += row_step * ROWS) {
    int valid = 0;
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      valid += (n + k * row_step < n_end) ? 1 : 0;
    }
    const int64_t plane = (n * t.channels + c) * t.spatial;
    for (int64_t s = s_begin + threadIdx.x * VEC; s < s_end; s += blockDim.x * VEC) {
      f(Tile{plane + s, plane_stride, valid});
    }
  }
}

// Calls f(tile) for each tile this thread owns in split `split` among the channels c0 .. c0 +
// VEC - 1: ROWS rows x VEC channels.
template <int VEC, int ROWS, typename F>
__device__ __forceinline__ void visit_rows(const RowTiling& t, int64_t c0, int64_t split, F&& f) {
  const int64_t r_begin = split * t.row_chunk;
  const int64_t r_end = min_of(t.rows, r_begin + t.row_chunk);
  const int64_t row_step = blockDim.y;
  for (int64_t r = r_begin + threadIdx.y; r < r_end; r += row_step * ROWS) {
    int valid = 0;
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      valid += (r + k * row_step < r_end) ? 1 : 0;
    }
    f(Tile{r * t.channels + c0, row_step * t.channels, valid});
  }
}

// Rows a thread of `Op` loads before using any (plan::rows_per_tile), in either layout.
template <typename Op, int VEC, bool kChannelsLast>
constexpr int kRowsPerTile = plan::rows_per_tile(
    Op::kKind, kChannelsLast, VEC, static_cast<int>(sizeof(typename Op::scalar_type)), Op::kInputs);

// Loads the existing rows of one tile of the op's inputs (x, and dy for two-input ops): all of
// them (kFull, a compile-time promise that tile.valid == ROWS), or the first tile.valid. Every
// load is issued before any is converted: with a branch or a conversion between two loads, the
// second waits for the first, and a thread has one load in flight instead of ROWS.
template <bool kFull, int VEC, int ROWS, typename Op, typename acc_t>
__device__ __forceinline__ void load_tile(const Op& op, const Tile& tile, acc_t (&x)[ROWS][VEC],
                                          acc_t (&dy)[ROWS][VEC]) {
  using scalar_t = typename Op::scalar_type;
  Pack<scalar_t, VEC> x_raw[ROWS] = {};
  Pack<scalar_t, VEC> dy_raw[ROWS] = {};
#pragma unroll
  for (int k = 0; k < ROWS; ++k) {
    if (kFull || k < tile.valid) {
      x_raw[k] = load_raw<VEC>(op.x, tile.base + k * tile.stride);
      if constexpr (Op::kInputs == 2) {
        dy_raw[k] = load_raw<VEC>(op.dy, tile.base + k * tile.stride);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < ROWS; ++k) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      x[k][v] = lane_value<acc_t>(x_raw[k], v);
      if constexpr (Op::kInputs == 2) {
        dy[k][v] = lane_value<acc_t>(dy_raw[k], v);
      }
    }
  }
}

// out = op.apply(x, dy, coeffs of the element's channel) over one tile; coeff_of(v) gives the
// coefficients of vector lane v.
// The inputs stay packed until their lane is used and each result is packed as soon as it is
// computed: for 2-byte types that holds VEC / 2 registers per input row, not VEC, through the
// element formula (an activation's body needs the rest beside VEC lanes of coefficients).
// A full tile (kFull) loads every row unconditionally, as load_tile does, so that all its loads are
// in flight before the first is used.
template <bool kFull, int VEC, int ROWS, typename Op, typename CoeffOf>
__device__ __forceinline__ void transform_rows(const Op& op, const Tile& tile, CoeffOf&& coeff_of) {
  using acc_t = typename Op::acc_t;
  using scalar_t = typename Op::scalar_type;
  Pack<scalar_t, VEC> x[ROWS] = {};
  Pack<scalar_t, VEC> dy[ROWS] = {};
#pragma unroll
  for (int k = 0; k < ROWS; ++k) {
    if (kFull || k < tile.valid) {
      x[k] = load_raw<VEC>(op.x, tile.base + k * tile.stride);
      if constexpr (Op::kInputs == 2) {
        dy[k] = load_raw<VEC>(op.dy, tile.base + k * tile.stride);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < ROWS; ++k) {
    if (kFull || k < tile.valid) {
      Pack<scalar_t, VEC> y;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        y.v[v] = static_cast<scalar_t>(
            op.apply(lane_value<acc_t>(x[k], v), lane_value<acc_t>(dy[k], v), coeff_of(v)));
      }
      store_raw<VEC>(op.out, tile.base + k * tile.stride, y);
    }
  }
}

// Full tiles take their own path for vector loads of 4-byte or narrower elements; for scalar
// loads (the compiler keeps them in flight anyway) and double, the second path's registers would
// spill.
template <int VEC, int ROWS, typename Op, typename CoeffOf>
__device__ __forceinline__ void transform_tile(const Op& op, const Tile& tile, CoeffOf&& coeff_of) {
  using scalar_t = typename Op::scalar_type;
  constexpr bool kFullPath = VEC * sizeof(scalar_t) >= 8 && sizeof(scalar_t) <= 4;
  if (kFullPath && tile.valid == ROWS) {
    transform_rows<true, VEC, ROWS>(op, tile, coeff_of);
  } else {
    transform_rows<false, VEC, ROWS>(op, tile, coeff_of);
  }
}

// The coefficients of a channels_last tile (at most plan::kMaxRowBlockX threads x VEC channels),
// in shared memory: all rows of the block use them, so each is computed once per block, not once
// per thread row. Field f of lane v of thread column x is at [(v * kFields + f) * kMaxRowBlockX +
// x], so that a warp's reads of one field and lane fall in distinct banks.
template <typename Coeffs, int VEC>
struct CoeffTable {
  using acc_t = decltype(Coeffs::mean);
  static constexpr int kFields = sizeof(Coeffs) / sizeof(acc_t);
  acc_t fields[VEC * kFields * plan::kMaxRowBlockX];

  // Thread column x, lane v: its channel is x * VEC + v of the tile.
  __device__ __forceinline__ void store(int x, int v, const Coeffs& c) {
    acc_t f[kFields];
    std::memcpy(f, &c, sizeof(Coeffs));
#pragma unroll
    for (int i = 0; i < kFields; ++i) {
      fields[(v * kFields + i) * plan::kMaxRowBlockX + x] = f[i];
    }
  }
  // A volatile read stays where it is used, in the row loop, rather than being hoisted out of it.
  template <bool kVolatile>
  __device__ __forceinline__ Coeffs load(int x, int v) const {
    const std::conditional_t<kVolatile, const volatile acc_t*, const acc_t*> table = fields;
    acc_t f[kFields];
#pragma unroll
    for (int i = 0; i < kFields; ++i) {
      f[i] = table[(v * kFields + i) * plan::kMaxRowBlockX + x];
    }
    Coeffs c;
    std::memcpy(&c, f, sizeof(Coeffs));
    return c;
  }
};

// Whether a thread reads its coefficients from the table in the row loop, for each row, rather than
// once into registers: when VEC lanes of them would take more than half of its 64 registers
// (fp16 and bf16 grad_input with an activation, 40), too few would be left for the activation's
// backward and the kernel would spill.
template <typename Op, int VEC>
constexpr bool kCoeffsInLoop =
    VEC * Op::kCoeffFields * static_cast<int>(sizeof(typename Op::acc_t)) > 32 * 4;

// ---------------------------------------------------------------------------------------------
// Block-level merges.

template <typename Red>
__device__ __forceinline__ typename Red::State warp_reduce(typename Red::State s) {
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) {
    s = Red::merge(s, Red::shfl_down(s, delta));
  }
  return s;
}

// Merges every thread's state; all threads receive the total. `shared` holds kThreads / 32 states.
template <typename Red>
__device__ __forceinline__ typename Red::State block_reduce(typename Red::State s,
                                                            typename Red::State* shared) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warps = (blockDim.x * blockDim.y) / 32;
  s = warp_reduce<Red>(s);
  if (lane == 0) {
    shared[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    s = warp_reduce<Red>(lane < warps ? shared[lane] : Red::identity());
    __syncwarp();  // every lane has read `shared` before lane 0 overwrites its first entry
    if (lane == 0) {
      shared[0] = s;
    }
  }
  __syncthreads();
  const typename Red::State total = shared[0];
  __syncthreads();  // every thread has read the total before the next call overwrites `shared`
  return total;
}

// Merges the states of each of `width` columns of the block's threads (thread tid is column
// tid % width, row tid / width; width a power of two dividing the block); every thread receives its
// column's total. `shared` holds one state per thread.
template <typename Red>
__device__ __forceinline__ typename Red::State column_reduce(typename Red::State s,
                                                             typename Red::State* shared, int tid,
                                                             int width) {
  const int rows = (blockDim.x * blockDim.y) / width;
  shared[tid] = s;
  __syncthreads();
  for (int half = rows / 2; half > 0; half >>= 1) {
    if (tid < half * width) {
      shared[tid] = Red::merge(shared[tid], shared[tid + half * width]);
    }
    __syncthreads();
  }
  const typename Red::State total = shared[tid % width];
  __syncthreads();  // the caller's next column_reduce overwrites `shared`
  return total;
}

// Merges the states of one block column (same threadIdx.x, all threadIdx.y): column_reduce with
// the block's own columns. blockDim.y is a power of two.
template <typename Red>
__device__ __forceinline__ typename Red::State column_reduce(typename Red::State s,
                                                             typename Red::State* shared) {
  return column_reduce<Red>(s, shared, threadIdx.y * blockDim.x + threadIdx.x, blockDim.x);
}

// ---------------------------------------------------------------------------------------------
// Split reductions in one launch: each block of a split tile stores its partial states, then takes
// a ticket from the tile's arrival counter; the block that takes the last ticket merges the tile.

// Whether this block is the last of `splits` to finish its tile, whose arrival counter is
// `counter`; every thread gets the answer. The fence makes each thread's partial stores visible
// device-wide before its block's ticket is taken (and, in the last block, orders the merge's loads
// after the ticket). The last block resets the counter: every counter is zero between launches.
__device__ __forceinline__ bool last_to_arrive(unsigned* counter, unsigned splits, bool& flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const bool last = atomicAdd(counter, 1u) == splits - 1;
    if (last) {
      atomicExch(counter, 0u);
    }
    flag = last;
  }
  __syncthreads();
  // Every thread reads the flag before the next call's leader writes it: the barriers of that
  // call come first.
  const bool last = flag;
  if (last) {
    __threadfence();
  }
  return last;
}

// This thread's share of merging channel c's partial states partial[i * channels + c], for i =
// first, first + step, ... < splits. The loads bypass L1, which other SMs' stores do not update.
template <typename Red>
__device__ __forceinline__ typename Red::State merge_partial_states(
    const typename Red::State* partial, int64_t splits, int64_t channels, int64_t c, int first,
    int step) {
  typename Red::State s = Red::identity();
  for (int64_t i = first; i < splits; i += step) {
    s = Red::merge(s, Red::load_partial(partial + i * channels + c));
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Kernels.

// One channel per tile. A unit that holds a whole channel (one split) finishes it, and a fused
// reduction then writes its grad_input; with splits, each unit leaves its partial state in
// partial[split][c], and the last of the channel's units to arrive (arrivals[c]) finishes it.
template <typename Red, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    reduce_planes_kernel(const Red red, const PlaneTiling t, typename Red::State* partial,
                         unsigned* arrivals) {
  using State = typename Red::State;
  using acc_t = typename Red::acc_t;
  constexpr int ROWS = kRowsPerTile<Red, VEC, false>;
  __shared__ State shared[kThreads / 32];
  __shared__ bool last_flag;

  // A fused reduction holds whole channels (planned with one split): no merge is compiled in.
  const bool split_channels = !Red::kFusable && t.splits > 1;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const bool leader = tid == 0;
  // Every thread of the block runs the same units, so the barriers inside block_reduce are met.
  for (UnitWalk u(t.channels); u.unit < t.units; u.next(t.channels, t.step)) {
    const int64_t c = u.tile;
    const int64_t split = u.split;
    const typename Red::Channel channel = red.channel(c);
    State state = Red::identity();
    visit_planes<VEC, ROWS>(t, c, split, [&](const Tile& tile) {
      acc_t x[ROWS][VEC] = {};
      acc_t dy[ROWS][VEC] = {};
      if (tile.valid == ROWS) {
        load_tile<true, VEC, ROWS>(red, tile, x, dy);
        red.template add<ROWS * VEC>(state, &x[0][0], &dy[0][0], channel);
      } else {
        load_tile<false, VEC, ROWS>(red, tile, x, dy);
#pragma unroll
        for (int k = 0; k < ROWS; ++k) {
          if (k < tile.valid) {
            red.template add<VEC>(state, x[k], dy[k], channel);
          }
        }
      }
    });
    const State total = block_reduce<Red>(state, shared);
    if (split_channels) {
      if (leader) {
        partial[split * t.channels + c] = total;
      }
      if (last_to_arrive(arrivals + c, static_cast<unsigned>(t.splits), last_flag)) {
        const State merged = block_reduce<Red>(
            merge_partial_states<Red>(partial, t.splits, t.channels, c, tid, kThreads), shared);
        if (leader) {
          red.finish(c, merged);
        }
      }
      continue;
    }
    if (leader) {
      red.finish(c, total);
    }
    if constexpr (Red::kFusable) {
      if (red.fused()) {
        const auto coeffs = red.element_coeffs(c, total);
        visit_planes<VEC, ROWS>(t, c, split, [&](const Tile& tile) {
          transform_tile<VEC, ROWS>(red.element, tile, [&](int) { return coeffs; });
        });
      }
    }
  }
}

// The states of a thread's VEC channels in reduce_rows_kernel's row loop, VEC States; a reduction
// may keep a leaner form (below).
template <typename Red, int VEC>
struct RowStates {
  using State = typename Red::State;
  using acc_t = typename Red::acc_t;
  State lanes[VEC];

  __device__ __forceinline__ RowStates() {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      lanes[v] = Red::identity();
    }
  }
  // Adds the first `valid` rows of a tile; channel_of(v) gives lane v's channel data.
  template <int ROWS, typename ChannelOf>
  __device__ __forceinline__ void add(const Red& red, const acc_t (&x)[ROWS][VEC],
                                      const acc_t (&dy)[ROWS][VEC], int valid,
                                      ChannelOf&& channel_of) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      acc_t x_column[ROWS];
      acc_t dy_column[ROWS];
#pragma unroll
      for (int k = 0; k < ROWS; ++k) {
        x_column[k] = x[k][v];
        dy_column[k] = dy[k][v];
      }
      if (valid == ROWS) {
        red.template add<ROWS>(lanes[v], x_column, dy_column, channel_of(v));
      } else {
#pragma unroll
        for (int k = 0; k < ROWS; ++k) {
          if (k < valid) {
            red.template add<1>(lanes[v], &x_column[k], &dy_column[k], channel_of(v));
          }
        }
      }
    }
  }
  __device__ __forceinline__ State lane(int v) const { return lanes[v]; }
};

// Welford states of channels that see the same rows have the same count: one count for the VEC
// lanes instead of one 64-bit count each, which is what lets 8 lanes fit the register budget. Each
// lane's mean and M2 take the very steps StatsReduction::add would.
template <typename scalar_t, typename acc_t, int VEC>
struct RowStates<StatsReduction<scalar_t, acc_t>, VEC> {
  using State = math::Welford<acc_t>;
  acc_t mean[VEC];
  acc_t m2[VEC];
  int64_t count;

  __device__ __forceinline__ RowStates() : count(0) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      mean[v] = acc_t(0);
      m2[v] = acc_t(0);
    }
  }
  template <int ROWS, typename ChannelOf>
  __device__ __forceinline__ void add(const StatsReduction<scalar_t, acc_t>&,
                                      const acc_t (&x)[ROWS][VEC], const acc_t (&)[ROWS][VEC],
                                      int valid, ChannelOf&&) {
    if (ROWS > 1 && valid == ROWS) {
      const auto weights = math::welford_merge_weights<acc_t>(count, ROWS);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc_t x_column[ROWS];
#pragma unroll
        for (int k = 0; k < ROWS; ++k) {
          x_column[k] = x[k][v];
        }
        const State chunk = chunk_moments<ROWS>(x_column);
        math::welford_merge_moments(mean[v], m2[v], chunk.mean, chunk.m2, weights);
      }
      count = weights.count;
      return;
    }
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      if (k < valid) {
        ++count;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          math::welford_update_moments(mean[v], m2[v], x[k][v], count);
        }
      }
    }
  }
  __device__ __forceinline__ State lane(int v) const {
    return math::welford_from_moments<acc_t>(count, mean[v], m2[v]);
  }
};

// Whether a thread of reduce_rows_kernel reads its channels' data (a fused activation's
// coefficients) from a table in the row loop rather than holding VEC of them in registers, which
// would leave too few for the activation's backward.
template <typename Red, int VEC>
constexpr bool kChannelsInLoop =
    VEC * Red::kChannelFields * static_cast<int>(sizeof(typename Red::acc_t)) > 16 * 4;

// The table of a fused reduction's grad_input coefficients in reduce_rows_kernel; none otherwise.
template <typename Red, int VEC, typename = void>
struct ElementCoeffTable {
  using type = NoChannelData;
};
template <typename Red, int VEC>
struct ElementCoeffTable<Red, VEC, std::enable_if_t<Red::kFusable>> {
  using type = CoeffTable<typename decltype(Red::element)::Coeffs, VEC>;
};

// VEC adjacent channels per thread, blockDim.x * VEC channels per tile. Partial results as in
// reduce_planes_kernel, arrivals counted per tile. The channel data of the row loop and the
// coefficients of a fused grad_input are computed once per block column and shared through tables,
// as in elementwise_rows_kernel.
template <typename Red, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    reduce_rows_kernel(const Red red, const RowTiling t, typename Red::State* partial,
                       unsigned* arrivals) {
  using State = typename Red::State;
  using acc_t = typename Red::acc_t;
  using Channel = typename Red::Channel;
  constexpr int ROWS = kRowsPerTile<Red, VEC, true>;
  constexpr bool kChannelInLoop = kChannelsInLoop<Red, VEC>;
  static_assert(plan::kMaxRowBlockX * VEC <= kThreads, "a channel of the tile per thread");
  __shared__ State shared[kThreads];
  __shared__ std::conditional_t<kChannelInLoop, CoeffTable<Channel, VEC>, NoChannelData> channels;
  __shared__ typename ElementCoeffTable<Red, VEC>::type coeff_table;
  __shared__ bool last_flag;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int tile_width = blockDim.x * VEC;

  const bool split_channels = !Red::kFusable && t.splits > 1;  // as in reduce_planes_kernel
  // Every thread of the block runs the same units, inactive ones (channels past C) included, so
  // the barriers are met.
  for (UnitWalk u(t.tiles); u.unit < t.units; u.next(t.tiles, t.step)) {
    const int64_t split = u.split;
    const int64_t tile_c0 = int64_t{u.tile} * tile_width;
    const int64_t c0 = tile_c0 + threadIdx.x * VEC;
    const bool active = c0 < t.channels;  // C % VEC == 0: a thread has all VEC channels or none
    Channel channel[kChannelInLoop ? 1 : VEC];
    if constexpr (kChannelInLoop) {
      // The previous unit's readers are past the barriers of its column_reduce.
      if (tid < tile_width && tile_c0 + tid < t.channels) {
        channels.store(tid / VEC, tid % VEC, red.channel(tile_c0 + tid));
      }
      __syncthreads();
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        channel[v] = red.channel(active ? c0 + v : 0);
      }
    }
    RowStates<Red, VEC> states;
    if (active) {
      visit_rows<VEC, ROWS>(t, c0, split, [&](const Tile& tile) {
        acc_t x[ROWS][VEC] = {};
        acc_t dy[ROWS][VEC] = {};
        const auto channel_of = [&](int v) {
          if constexpr (kChannelInLoop) {
            return channels.template load<true>(threadIdx.x, v);
          } else {
            return channel[v];
          }
        };
        if (tile.valid == ROWS) {
          load_tile<true, VEC, ROWS>(red, tile, x, dy);
          states.add(red, x, dy, ROWS, channel_of);
        } else {
          load_tile<false, VEC, ROWS>(red, tile, x, dy);
          states.add(red, x, dy, tile.valid, channel_of);
        }
      });
    }
    // Each lane's column total; row 0 of the column writes it out, and a fused grad_input's
    // coefficients into the table.
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const State total = column_reduce<Red>(states.lane(v), shared);
      if (active && threadIdx.y == 0) {
        if (split_channels) {
          partial[split * t.channels + c0 + v] = total;
        } else {
          red.finish(c0 + v, total);
          if constexpr (Red::kFusable) {
            if (red.fused()) {
              coeff_table.store(threadIdx.x, v, red.element_coeffs(c0 + v, total));
            }
          }
        }
      }
    }
    if (split_channels &&
        last_to_arrive(arrivals + u.tile, static_cast<unsigned>(t.splits), last_flag)) {
      // The tile's channels, tile_width of them, each merged by kThreads / tile_width threads.
      const int64_t c = tile_c0 + tid % tile_width;
      const State merged = column_reduce<Red>(
          c < t.channels ? merge_partial_states<Red>(partial, t.splits, t.channels, c,
                                                     tid / tile_width, kThreads / tile_width)
                         : Red::identity(),
          shared, tid, tile_width);
      if (tid < tile_width && c < t.channels) {
        red.finish(c, merged);
      }
    }
    if constexpr (Red::kFusable) {
      if (!split_channels && red.fused()) {
        using Element = decltype(red.element);
        constexpr bool kInLoop = kCoeffsInLoop<Element, VEC>;
        __syncthreads();
        if (active) {
          typename Element::Coeffs coeffs[kInLoop ? 1 : VEC];
#pragma unroll
          for (int v = 0; v < (kInLoop ? 0 : VEC); ++v) {
            coeffs[v] = coeff_table.template load<false>(threadIdx.x, v);
          }
          visit_rows<VEC, ROWS>(t, c0, split, [&](const Tile& tile) {
            transform_tile<VEC, ROWS>(red.element, tile, [&](int v) {
              return kInLoop ? coeff_table.template load<true>(threadIdx.x, v) : coeffs[v];
            });
          });
        }
        // The next unit's stores to the table follow the barriers of its column_reduce.
      }
    }
  }
}

template <typename Op, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    elementwise_planes_kernel(const Op op, const PlaneTiling t) {
  constexpr int ROWS = kRowsPerTile<Op, VEC, false>;
  for (UnitWalk u(t.channels); u.unit < t.units; u.next(t.channels, t.step)) {
    const auto coeffs = op.coeffs(u.tile);
    visit_planes<VEC, ROWS>(t, u.tile, u.split, [&](const Tile& tile) {
      transform_tile<VEC, ROWS>(op, tile, [&](int) { return coeffs; });
    });
  }
}

template <typename Op, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    elementwise_rows_kernel(const Op op, const RowTiling t) {
  constexpr int ROWS = kRowsPerTile<Op, VEC, true>;
  constexpr bool kInLoop = kCoeffsInLoop<Op, VEC>;
  static_assert(plan::kMaxRowBlockX * VEC <= kThreads, "a channel of the tile per thread");
  __shared__ CoeffTable<typename Op::Coeffs, VEC> table;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int tile_width = blockDim.x * VEC;
  // Every thread of the block runs the same units, so the barriers are met.
  for (UnitWalk u(t.tiles); u.unit < t.units; u.next(t.tiles, t.step)) {
    const int64_t tile_c0 = int64_t{u.tile} * tile_width;
    if (tid < tile_width && tile_c0 + tid < t.channels) {
      table.store(tid / VEC, tid % VEC, op.coeffs(tile_c0 + tid));
    }
    __syncthreads();
    const int64_t c0 = tile_c0 + threadIdx.x * VEC;
    if (c0 < t.channels) {
      typename Op::Coeffs coeffs[kInLoop ? 1 : VEC];
#pragma unroll
      for (int v = 0; v < (kInLoop ? 0 : VEC); ++v) {
        coeffs[v] = table.template load<false>(threadIdx.x, v);
      }
      visit_rows<VEC, ROWS>(t, c0, u.split, [&](const Tile& tile) {
        transform_tile<VEC, ROWS>(op, tile, [&](int v) {
          return kInLoop ? table.template load<true>(threadIdx.x, v) : coeffs[v];
        });
      });
    }
    __syncthreads();  // every thread is done with the table before the next unit's
  }
}

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

template <typename Op>
plan::Plan plan_elementwise(const Geometry& g, std::initializer_list<const void*> pointers,
                            const at::Tensor& on) {
  const plan::Shape shape = plan_shape(g, sizeof(typename Op::scalar_type), Op::kInputs);
  const int vec = plan::vector_width(plan::Kind::Elementwise, shape, aligned_bytes(pointers));
  const int device = on.get_device();
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
    // Kept alive by the graph's memory pool for as long as the graph is.
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
                                 const at::Tensor& on);
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
