// elementwise_flat_kernel: normalize and grad_input over ChannelPlanes read as one flat run of
// N * C * S elements, for planes whose spatial size admits no 16-byte loads along them (S odd:
// 7 x 7). Its vectors cross plane boundaries; plan::plan_flat plans it and says where it runs.
#pragma once

#include "kernels.cuh"

#include <cstdint>

namespace ckbn {
namespace gpu {

// ChannelPlanes read as one flat run of numel = N * C * S elements (plan::plan_flat): unit u is
// groups x ROWS x kThreads vectors of VEC elements, the units in order; the numel % VEC elements
// after the last whole vector are the tail.
struct FlatTiling {
  int64_t numel;
  int64_t units;
  unsigned spatial;   // S, at most 2^30
  unsigned channels;  // C
  unsigned groups;
  // How far one grid stride (gridDim.x units) moves a unit's first element: step_planes planes
  // (mod C) and step_offset elements.
  unsigned step_planes;
  unsigned step_offset;
};

// Where an element of a flat run lies: `plane` planes past a reference plane, `at` elements into
// its plane (< S).
struct FlatPosition {
  unsigned plane;
  unsigned at;

  // Moves `planes` planes and `offset` (< S) elements on.
  __device__ __forceinline__ void advance(unsigned planes, unsigned offset, unsigned spatial) {
    at += offset;
    plane += planes;
    if (at >= spatial) {
      at -= spatial;
      ++plane;
    }
  }
};

// Planes as one flat run (FlatTiling). A unit's block first fills `table` with the coefficients
// of the planes the unit covers, one per thread (plan_flat keeps them at most kThreads); thread
// t's row k of each group is then the vector k * kThreads + t, whose lanes take the coefficients
// of their plane: the one it starts in, or the next (S >= VEC: a vector spans two at most).
// Positions are stepped, never divided, in the loops; the block of unit 0 ends with the tail.
template <typename Op, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    elementwise_flat_kernel(const Op op, const FlatTiling t) {
  using Coeffs = typename Op::Coeffs;
  constexpr int ROWS = plan::flat_rows(sizeof(typename Op::scalar_type), Op::kInputs);
  static_assert(VEC * sizeof(typename Op::scalar_type) == 16, "16-byte loads");
  constexpr unsigned kRow = kThreads * VEC;  // elements of one row of a group
  constexpr unsigned kGroup = ROWS * kRow;
  const int64_t vectors = t.numel / VEC;
  const int64_t unit_vectors = int64_t{t.groups} * ROWS * kThreads;
  __shared__ Coeffs table[kThreads];
  const unsigned tid = threadIdx.x;
  const unsigned spatial = t.spatial;
  const unsigned row_planes = kRow / spatial;
  const unsigned row_offset = kRow % spatial;
  const unsigned group_planes = kGroup / spatial;
  const unsigned group_offset = kGroup % spatial;
  // The unit's first element: `offset` into a plane of channel `channel`. The only 64-bit
  // divisions, once per block.
  const int64_t first = int64_t{blockIdx.x} * unit_vectors * VEC;
  unsigned offset = static_cast<unsigned>(first % spatial);
  unsigned channel = static_cast<unsigned>((first / spatial) % t.channels);
  const unsigned unit_elements = t.groups * kGroup;  // unit_vectors * VEC
  for (int64_t u = blockIdx.x; u < t.units; u += gridDim.x) {
    const unsigned planes = (offset + unit_elements - 1) / spatial + 2;
    if (tid < planes) {
      table[tid] = op.coeffs((channel + tid) % t.channels);
    }
    __syncthreads();
    // Row k of the first group, in planes past the unit's first.
    FlatPosition row[ROWS];
    row[0] = FlatPosition{(offset + tid * VEC) / spatial, (offset + tid * VEC) % spatial};
#pragma unroll
    for (int k = 1; k < ROWS; ++k) {
      row[k] = row[k - 1];
      row[k].advance(row_planes, row_offset, spatial);
    }
    int64_t vector = u * unit_vectors + tid;
    for (unsigned g = 0; g < t.groups && vector < vectors; ++g) {
      int valid = 0;
#pragma unroll
      for (int k = 0; k < ROWS; ++k) {
        valid += vector + int64_t{k} * kThreads < vectors ? 1 : 0;
      }
      transform_tile<VEC, ROWS>(op, Tile{vector * VEC, kRow, valid}, [&](int k, int v) {
        const bool in_next = row[k].at + v >= spatial;
        if constexpr (2 * sizeof(Coeffs) <= 48) {
          // Both entries, then a choice per lane: the reads are the same for every lane of a row.
          const Coeffs start = table[row[k].plane];
          const Coeffs next = table[row[k].plane + 1];
          return in_next ? next : start;
        } else {
          // Two double BackwardCoeffs would take 20 registers: each lane reads its own.
          return table[row[k].plane + (in_next ? 1 : 0)];
        }
      });
#pragma unroll
      for (int k = 0; k < ROWS; ++k) {
        row[k].advance(group_planes, group_offset, spatial);
      }
      vector += ROWS * kThreads;
    }
    __syncthreads();  // every thread is done with the table before the next unit's
    offset += t.step_offset;
    channel += t.step_planes;
    if (offset >= spatial) {
      offset -= spatial;
      ++channel;
    }
    channel = channel >= t.channels ? channel - t.channels : channel;
  }
  if (blockIdx.x == 0 && tid < t.numel - vectors * VEC) {
    const int64_t e = vectors * VEC + tid;
    const Coeffs coeffs = op.coeffs((e / spatial) % t.channels);
    transform_rows<false, 1, 1>(op, Tile{e, 0, 1}, [&](int, int) { return coeffs; });
  }
}

}  // namespace gpu
}  // namespace ckbn
