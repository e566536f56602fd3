// Launch planning for the CUDA kernels: pure host arithmetic, with no CUDA runtime call and no
// torch header, so that the plans can be computed and checked on a machine without a GPU.
//
// The runtime (launch.cuh) asks the device once, cached per device and per kernel, for
// DeviceLimits and calls the functions below. To reproduce a plan elsewhere (bench/gpu_static.py
// compiles this header with H100/H200 numbers), for one operator call:
//   1. Shape: the kernel view of the input (ckbn.h's Geometry): batch N, channels C, spatial S
//      (product of the dims after C), whether C is innermost (input with S == 1, 2-D input
//      included, always runs channels_last), the element size of the input dtype, and the
//      full-size inputs of the kernel: 1 for batch_stats and normalize, 2 for the backward's.
//   2. vec = vector_width(kind, shape, aligned_bytes): aligned_bytes is the largest power of two,
//      at most 16, that divides the address of every tensor the kernel reads or writes (16 for
//      fresh allocations at offset 0).
//   3. The kernel that runs is then, by kind and shape.channels_last:
//        Reduce:       reduce_planes_kernel<Red, vec> / reduce_rows_kernel<Red, vec>,
//                      Red = StatsReduction<scalar_t, acc_t> (batch_stats) or
//                      GradReduction<scalar_t, acc_t> (backward, backward_reduce);
//        Elementwise:  elementwise_planes_kernel<Op, vec> / elementwise_rows_kernel<Op, vec>,
//                      Op = NormalizeElementwise<scalar_t, acc_t> (normalize) or
//                      BackwardElementwise<scalar_t, acc_t> (backward, backward_elemt);
//                      over planes, elementwise_flat_kernel<Op, flat_vec> instead when
//                      flat_vector_width(shape, vec, aligned_bytes) gives flat_vec > 0 and
//                      plan_flat(shape, flat_vec, limits of that kernel) fills the GPU
//                      (flat_fills).
//      DeviceLimits.blocks_per_multiprocessor is that kernel's resident blocks per SM at kThreads
//      threads and no dynamic shared memory: cudaOccupancyMaxActiveBlocksPerMultiprocessor, or
//      the same computed from its registers and static shared memory (cuobjdump -res-usage).
//   4. plan_launch(kind, shape, vec, limits) gives the grid. A Reduce plan with splits > 1 merges
//      each tile's partial states in the last of its blocks to finish: still one launch.
//   5. backward runs a GradReduction when grad_weight or grad_bias is wanted, or grad_input in
//      training; with grad_input wanted too, fuse_backward(shape, fused, reduce, elementwise,
//      l2_bytes) decides, given fused = plan_launch(Reduce, ..., max_splits = 1) and reduce =
//      plan_launch(Reduce, ...) of the GradReduction kernel and elementwise =
//      plan_launch(Elementwise, ...) of BackwardElementwise: true, the one `fused` kernel runs;
//      false, `reduce` then `elementwise`. Without a reduction it runs `elementwise`
//      (grad_input in eval mode) or nothing.
#pragma once

#include <cstdint>

// rows_per_tile is also a compile-time constant of the kernels.
#if defined(__CUDACC__)
#define CKBN_PLAN_HOST_DEVICE __host__ __device__
#else
#define CKBN_PLAN_HOST_DEVICE
#endif

namespace ckbn {
namespace plan {

// Threads of every reduce and element-wise block.
constexpr int kThreads = 512;
// Threads across the channels of a channels_last block, at most: a warp reads adjacent channels.
constexpr int kMaxRowBlockX = 32;
// Blocks along one channel, at most: bounds the staging buffer and the last block's merge.
constexpr int64_t kMaxSplits = 32768;
// Rounds of resident blocks the planner considers: beyond this, more splits only add overhead.
constexpr int64_t kMaxRounds = 8;
// Share of the resident block slots a plan keeps busy (its last round included) for it to count as
// filling the GPU; plans that do are preferred to cheaper-looking ones that do not.
constexpr double kMinFill = 0.8;
// A block's fixed cost (start, coefficients, block merge, partial store), as the number of
// elements its threads could load in that time; what keeps channels from being split too finely.
constexpr int64_t kReduceUnitCost = kThreads * 8;
constexpr int64_t kElementwiseUnitCost = kThreads * 2;

enum class Kind { Reduce, Elementwise };

struct DeviceLimits {
  int multiprocessors;            // SMs
  int blocks_per_multiprocessor;  // resident blocks of the kernel planned (see above), at least 1
  int64_t l2_bytes;
};

struct Shape {
  int64_t batch;
  int64_t channels;
  int64_t spatial;
  bool channels_last;  // [rows][C] with rows = batch * spatial; else [N][C][S]
  int element_size;    // bytes of one input element
  int inputs;          // full-size inputs the kernel reads: 1 (x), or 2 (x and dy: the backward)
};

struct Plan {
  bool channels_last = false;
  // elementwise_flat_kernel: planes read as one run (see plan_flat).
  bool flat = false;
  int vec = 1;      // elements per load and store (a multiple of the contiguous extent)
  int rows = 1;     // rows (planes, or channels-last rows) one thread loads before using any
  int block_x = 1;  // block shape: block_x * block_y == kThreads
  int block_y = 1;
  int64_t grid = 1;          // blocks (a 1-D grid)
  int64_t tiles = 1;         // channel tiles: C (planes) or ceil(C / vec / block_x) (channels_last)
  int64_t splits = 1;        // units per tile: blocks sharing one channel's elements
  int64_t units = 1;         // tiles * splits; block b takes units b, b + grid, ... (grid-stride)
  bool grid_stride = false;  // units > grid: some block takes more than one unit
  // ChannelPlanes units: unit u = split * tiles + channel; split = batch_split * spatial_splits +
  // spatial_split, covering batch_chunk planes x spatial_chunk elements (a multiple of vec).
  int64_t batch_chunk = 0;
  int64_t spatial_chunk = 0;
  int64_t spatial_splits = 1;
  // ChannelsLast units: unit u = split * tiles + tile, covering row_chunk rows.
  int64_t row_chunk = 0;
  // Flat units: unit u is flat_groups groups of kThreads * rows vectors, from vector
  // u * flat_groups * kThreads * rows on.
  int64_t flat_groups = 0;
  // Wave accounting against the resident capacity multiprocessors * blocks_per_multiprocessor.
  int64_t resident_blocks = 1;
  double waves = 0;         // grid / resident_blocks
  int64_t rounds = 1;       // units a block takes, at most: ceil(units / grid)
  double unit_balance = 1;  // units / (rounds * grid): 1 when every block takes as many units
  double fill = 1;          // units / (rounds * resident_blocks): busy share of the block slots
  double cost = 0;          // the planner's figure of merit, in element loads per block slot
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) {
    p <<= 1;
  }
  return p;
}

template <typename T>
constexpr T min_of(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
constexpr T max_of(T a, T b) {
  return a < b ? b : a;
}

// Rows a thread loads before using any, by the kind of kernel, its layout, the elements of one
// load, their size and the number of full-size inputs: the bytes a thread has in flight. 32 bytes
// keep 32 KB of loads in flight on an SM holding two blocks of 512 threads (the register budget),
// over the 25 KB an H100/H200 needs to stream at full bandwidth (Little's law: 4.8 TB/s x 700 ns /
// 132 SMs). More where the registers allow it without spilling, as bench/gpu_static.py checks
// from the SASS: 64 bytes over planes with loads of 8 bytes or more (one channel's coefficients or
// state a thread), and channels_last with 128-bit loads of 4-byte elements (no lane conversion);
// 16 rows for batch_stats over planes with 2-byte loads (odd spatial sizes of half input). Else at
// most 8 rows. At least 1; a power of two.
CKBN_PLAN_HOST_DEVICE constexpr int rows_per_tile(Kind kind, bool channels_last, int vec,
                                                  int element_size, int inputs) {
  const int load_bytes = vec * element_size;
  const bool roomy = channels_last ? (load_bytes == 16 && element_size == 4) : load_bytes >= 8;
  const int bytes = roomy ? 64 : 32;
  const int max_rows = kind == Kind::Reduce && !channels_last && inputs == 1 ? 16 : 8;
  int rows = 1;
  while (rows < max_rows && 2 * rows * load_bytes * inputs <= bytes) {
    rows *= 2;
  }
  return rows;
}

// Widest load, in elements, a kernel of `kind` may use: 16 bytes (a channels_last reduction holds
// a state per lane, 8 lanes for fp16 and bf16).
constexpr int max_vector_width(Kind, bool, int element_size) { return 16 / element_size; }

// Elements per load: the widest power of two, at most max_vector_width, that divides the
// contiguous extent (S, or C when channels_last) and keeps every pointer aligned; 1 if none.
inline int vector_width(Kind kind, const Shape& s, int aligned_bytes) {
  const int64_t contiguous = s.channels_last ? s.channels : s.spatial;
  for (int vec = max_vector_width(kind, s.channels_last, s.element_size); vec > 1; vec /= 2) {
    if (contiguous % vec == 0 && aligned_bytes % (vec * s.element_size) == 0) {
      return vec;
    }
  }
  return 1;
}

namespace detail {

// Fills the unit geometry of `p` for `splits` requested blocks per tile (fewer may result: no
// unit is left empty) and returns the element loads of the busiest unit, in whole passes of the
// block over its tile.
inline int64_t place_units(const Shape& s, int64_t splits, Plan& p) {
  const int64_t pass = int64_t{kThreads} * p.vec * p.rows;
  if (!s.channels_last) {
    const int64_t spatial_vecs = s.spatial / p.vec;
    const int64_t plane_rows = int64_t{p.block_y} * p.rows;
    const int64_t batch_splits = min_of(splits, ceil_div(s.batch, plane_rows));
    const int64_t spatial_splits =
        max_of<int64_t>(1, min_of(splits / batch_splits, ceil_div(spatial_vecs, p.block_x)));
    p.batch_chunk = ceil_div(s.batch, batch_splits);
    const int64_t spatial_chunk_vecs = ceil_div(spatial_vecs, spatial_splits);
    p.spatial_chunk = spatial_chunk_vecs * p.vec;
    p.spatial_splits = ceil_div(spatial_vecs, spatial_chunk_vecs);
    p.splits = ceil_div(s.batch, p.batch_chunk) * p.spatial_splits;
    return ceil_div(p.batch_chunk, plane_rows) * ceil_div(spatial_chunk_vecs, p.block_x) * pass;
  }
  const int64_t rows = s.batch * s.spatial;
  p.row_chunk = ceil_div(rows, min_of(splits, rows));
  p.splits = ceil_div(rows, p.row_chunk);
  return ceil_div(p.row_chunk, int64_t{p.block_y} * p.rows) * pass;
}

}  // namespace detail

// The launch of one reduce or element-wise kernel over `s` with loads of `vec` elements (see
// vector_width), on a device with `d`. Among the splits of each channel tile that fill whole
// rounds of resident blocks, it keeps one that fills at least kMinFill of the block slots if any
// does, and of those the one of least cost: rounds x (passes of the busiest block + a block's
// fixed cost); ties go to more units (more of the GPU busy), then to fewer splits.
inline Plan plan_launch(Kind kind, const Shape& s, int vec, const DeviceLimits& d,
                        int64_t max_splits = kMaxSplits) {
  Plan p;
  p.channels_last = s.channels_last;
  p.vec = vec;
  p.rows = rows_per_tile(kind, s.channels_last, vec, s.element_size, s.inputs);
  if (s.channels_last) {
    // A warp (or what C fills of it) reads adjacent channels of a row.
    const int64_t channel_vecs = s.channels / vec;
    p.block_x = static_cast<int>(min_of<int64_t>(next_pow2(channel_vecs), kMaxRowBlockX));
    p.tiles = ceil_div(channel_vecs, p.block_x);
  } else {
    // Narrow planes get narrow rows of threads and more planes per block.
    p.block_x = static_cast<int>(min_of<int64_t>(next_pow2(s.spatial / vec), kThreads));
    p.tiles = s.channels;
  }
  p.block_y = kThreads / p.block_x;
  p.resident_blocks =
      int64_t{max_of(d.multiprocessors, 1)} * max_of(d.blocks_per_multiprocessor, 1);
  const int64_t unit_cost = kind == Kind::Reduce ? kReduceUnitCost : kElementwiseUnitCost;
  const int64_t split_cap = max_of<int64_t>(1, min_of(max_splits, kMaxSplits));

  Plan best;
  bool have_best = false;
  bool best_fills = false;
  // Candidates: the most splits that fit r rounds, r = 1 .. kMaxRounds, and one split.
  for (int64_t r = 0; r <= kMaxRounds; ++r) {
    const int64_t wanted = r == 0 ? 1 : max_of<int64_t>(1, r * p.resident_blocks / p.tiles);
    Plan c = p;
    const int64_t busiest = detail::place_units(s, min_of(wanted, split_cap), c);
    c.units = c.tiles * c.splits;
    c.grid = min_of(c.units, c.resident_blocks);
    c.grid_stride = c.units > c.grid;
    c.rounds = ceil_div(c.units, c.grid);
    c.unit_balance = static_cast<double>(c.units) / static_cast<double>(c.rounds * c.grid);
    c.waves = static_cast<double>(c.grid) / static_cast<double>(c.resident_blocks);
    c.cost = static_cast<double>(ceil_div(c.units, c.resident_blocks) * (busiest + unit_cost));
    c.fill = static_cast<double>(c.units) / static_cast<double>(c.rounds * c.resident_blocks);
    const bool fills = c.fill >= kMinFill;
    const bool better =
        !have_best || (fills && !best_fills) ||
        (fills == best_fills &&
         (c.cost < best.cost ||
          (c.cost == best.cost &&
           (c.units > best.units || (c.units == best.units && c.splits < best.splits)))));
    if (better) {
      best = c;
      best_fills = fills;
      have_best = true;
    }
  }
  return best;
}

// Element-wise kernels may read planes as one flat run of N * C * S elements
// (elementwise_flat_kernel): the vectors then cross plane boundaries, so that the loads are 16
// bytes wide whatever S is and no lane is idle, where planes with S odd (7 x 7) take scalar loads.
// A unit's block first fills a table of the coefficients of the planes the unit covers, one entry
// per thread (kThreads), then walks its groups: groups of kThreads x rows vectors, each thread's
// rows all in flight at once.

// Table entries a flat unit of `elements` over planes of `spatial` needs: the planes it can touch
// from any offset in its first one, and the plane after (the second plane of a vector that ends
// past the unit's last one is read, if not used).
CKBN_PLAN_HOST_DEVICE constexpr int64_t flat_table_planes(int64_t spatial, int64_t elements) {
  return (spatial + elements - 2) / spatial + 2;
}

// Groups of a flat unit, at most: more amortize the table, fewer leave more units for the GPU.
constexpr int64_t kMaxFlatGroups = 8;

// Rows a thread of a flat kernel loads before using any (16-byte loads): rows_per_tile as for
// channels_last, whose lanes too take coefficients of different channels (two lanes' worth of
// coefficients leave 32 bytes of loads, not 64, in the 16-bit kernels' registers).
CKBN_PLAN_HOST_DEVICE constexpr int flat_rows(int element_size, int inputs) {
  return rows_per_tile(Kind::Elementwise, true, 16 / element_size, element_size, inputs);
}

// The vector width of a flat element-wise kernel over `s`, or 0 where it does not apply: planes
// whose own vector width (planes_vec) is below the widest, and whose plan has no more bytes of
// loads in flight a thread (14 x 14 of 16-bit input: 8 rows of 8-byte loads, 64 bytes, against
// the flat kernel's 32); every pointer 16-byte aligned; planes long enough that a vector spans at
// most two and a group's planes fit the table.
inline int flat_vector_width(const Shape& s, int planes_vec, int aligned_bytes) {
  const int vec = max_vector_width(Kind::Elementwise, false, s.element_size);
  if (s.channels_last || planes_vec >= vec || aligned_bytes < 16 || s.spatial < vec ||
      s.spatial > (int64_t{1} << 30)) {
    return 0;
  }
  const int rows = flat_rows(s.element_size, s.inputs);
  const int planes_rows =
      rows_per_tile(Kind::Elementwise, false, planes_vec, s.element_size, s.inputs);
  if (rows * 16 < planes_rows * planes_vec * s.element_size) {
    return 0;
  }
  return flat_table_planes(s.spatial, int64_t{kThreads} * vec * rows) <= kThreads ? vec : 0;
}

// The flat launch over `s` with loads of `vec` (flat_vector_width) elements on a device with `d`:
// the most groups per unit (at most kMaxFlatGroups) whose planes fit the table and that leave a
// unit for every resident block, or one group.
inline Plan plan_flat(const Shape& s, int vec, const DeviceLimits& d) {
  Plan p;
  p.flat = true;
  p.vec = vec;
  p.rows = flat_rows(s.element_size, s.inputs);
  p.block_x = kThreads;
  p.block_y = 1;
  p.resident_blocks =
      int64_t{max_of(d.multiprocessors, 1)} * max_of(d.blocks_per_multiprocessor, 1);
  const int64_t group_vectors = int64_t{kThreads} * p.rows;
  const int64_t vectors = s.batch * s.channels * s.spatial / vec;
  p.flat_groups = 1;
  for (int64_t g = kMaxFlatGroups; g > 1; --g) {
    if (flat_table_planes(s.spatial, g * group_vectors * vec) <= kThreads &&
        ceil_div(vectors, g * group_vectors) >= p.resident_blocks) {
      p.flat_groups = g;
      break;
    }
  }
  const int64_t unit_vectors = p.flat_groups * group_vectors;
  p.units = ceil_div(vectors, unit_vectors);
  p.tiles = p.units;
  p.splits = 1;
  p.grid = max_of<int64_t>(1, min_of(p.units, p.resident_blocks));
  p.grid_stride = p.units > p.grid;
  p.rounds = ceil_div(p.units, p.grid);
  p.unit_balance = static_cast<double>(p.units) / static_cast<double>(p.rounds * p.grid);
  p.waves = static_cast<double>(p.grid) / static_cast<double>(p.resident_blocks);
  p.fill = static_cast<double>(p.units) / static_cast<double>(p.rounds * p.resident_blocks);
  p.cost = static_cast<double>(ceil_div(p.units, p.resident_blocks) *
                               (unit_vectors * vec + kElementwiseUnitCost));
  return p;
}

// Whether a flat plan keeps every resident block busy at least once. Its units are whole groups,
// so a small tensor has fewer than the GPU holds, where the planes plan splits channels finely
// enough to fill it: there the planes plan runs.
inline bool flat_fills(const Plan& p) { return p.flat && p.units >= p.resident_blocks; }

// Whether backward runs its reduction and grad_input in one kernel (each block holds whole
// channels: `fused`, planned with max_splits = 1) rather than `reduce` and then
// `elementwise`. Fused, grad_input re-reads x and dy from L2 when the blocks resident at once
// keep their channels there, and the DRAM traffic is 3 passes instead of 5; it is chosen when
// that holds and its cost, so weighted, is not higher than the two kernels'.
inline bool fuse_backward(const Shape& s, const Plan& fused, const Plan& reduce,
                          const Plan& elementwise, int64_t l2_bytes) {
  if (fused.splits != 1) {
    return false;
  }
  const int64_t per_tile_bytes = 2 * s.batch * s.spatial * s.element_size *
                                 (s.channels_last ? int64_t{fused.block_x} * fused.vec : 1);
  if (min_of(fused.grid, fused.resident_blocks) * per_tile_bytes > l2_bytes / 2) {
    return false;
  }
  // Cost x passes of DRAM traffic per element: fused 3 (its second sweep hits L2), split 2 + 3.
  return fused.cost * 3 <= reduce.cost * 2 + elementwise.cost * 3;
}

}  // namespace plan
}  // namespace ckbn
