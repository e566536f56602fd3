// The CUDA kernels of ckbn: which thread visits which element, and how a block's and a tile's
// partial results meet. The operations they run are in kernel_ops.cuh, their launch from a plan
// (launch_plan.h) in launch.cuh.
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
//   elementwise_*: normalize and grad_input (and flat_kernel.cuh's elementwise_flat_kernel,
//     which reads planes as one run).
// Every formula comes from batch_norm_math.h; these files decide only which thread visits which
// element.
//
// The kernels are instantiated by the operator files, one op family per translation unit so
// that they compile in parallel: stats.cu (batch_stats), normalize.cu, backward.cu (the three
// backward operators, whose kernels are instantiated in grad_reduction.cu and
// grad_elementwise.cu), running_stats.cu (update_running_stats).
#pragma once

#include "kernel_ops.cuh"

#include <cstdint>
#include <cstring>

namespace ckbn {
namespace gpu {

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

// Issues the loads of the existing rows of one tile of the op's inputs (x, and dy for two-input
// ops), still packed: all of them (kFull, a compile-time promise that tile.valid == ROWS), or the
// first tile.valid. Every load is issued before any is used: with a branch or a conversion between
// two loads, the second waits for the first, and a thread has one load in flight instead of ROWS.
template <bool kFull, int VEC, int ROWS, typename Op>
__device__ __forceinline__ void load_raw_tile(const Op& op, const Tile& tile,
                                              Pack<typename Op::scalar_type, VEC> (&x)[ROWS],
                                              Pack<typename Op::scalar_type, VEC> (&dy)[ROWS]) {
#pragma unroll
  for (int k = 0; k < ROWS; ++k) {
    if (kFull || k < tile.valid) {
      x[k] = load_raw<VEC>(op.x, tile.base + k * tile.stride);
      if constexpr (Op::kInputs == 2) {
        dy[k] = load_raw<VEC>(op.dy, tile.base + k * tile.stride);
      }
    }
  }
}

// The rows of one tile (load_raw_tile), converted to acc_t for a reduction.
template <bool kFull, int VEC, int ROWS, typename Op, typename acc_t>
__device__ __forceinline__ void load_tile(const Op& op, const Tile& tile, acc_t (&x)[ROWS][VEC],
                                          acc_t (&dy)[ROWS][VEC]) {
  using scalar_t = typename Op::scalar_type;
  Pack<scalar_t, VEC> x_raw[ROWS] = {};
  Pack<scalar_t, VEC> dy_raw[ROWS] = {};
  load_raw_tile<kFull>(op, tile, x_raw, dy_raw);
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

// out = op.apply(x, dy, coeffs of the element's channel) over one tile; coeff_of(k, v) gives the
// coefficients of vector lane v of row k.
// The inputs stay packed until their lane is used and each result is packed as soon as it is
// computed: for 2-byte types that holds VEC / 2 registers per input row, not VEC, through the
// element formula (an activation's body needs the rest beside VEC lanes of coefficients).
// The loads are load_raw_tile's, all in flight before the first is used.
template <bool kFull, int VEC, int ROWS, typename Op, typename CoeffOf>
__device__ __forceinline__ void transform_rows(const Op& op, const Tile& tile, CoeffOf&& coeff_of) {
  using acc_t = typename Op::acc_t;
  using scalar_t = typename Op::scalar_type;
  Pack<scalar_t, VEC> x[ROWS] = {};
  Pack<scalar_t, VEC> dy[ROWS] = {};
  load_raw_tile<kFull>(op, tile, x, dy);
#pragma unroll
  for (int k = 0; k < ROWS; ++k) {
    if (kFull || k < tile.valid) {
      Pack<scalar_t, VEC> y;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        y.v[v] = static_cast<scalar_t>(
            op.apply(lane_value<acc_t>(x[k], v), lane_value<acc_t>(dy[k], v), coeff_of(k, v)));
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
          transform_tile<VEC, ROWS>(red.element, tile, [&](int, int) { return coeffs; });
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
            transform_tile<VEC, ROWS>(red.element, tile, [&](int, int v) {
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
      transform_tile<VEC, ROWS>(op, tile, [&](int, int) { return coeffs; });
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
        transform_tile<VEC, ROWS>(op, tile, [&](int, int v) {
          return kInLoop ? table.template load<true>(threadIdx.x, v) : coeffs[v];
        });
      });
    }
    __syncthreads();  // every thread is done with the table before the next unit's
  }
}

}  // namespace gpu
}  // namespace ckbn
