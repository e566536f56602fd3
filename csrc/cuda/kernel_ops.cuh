// The element-wise operations and per-channel reductions that the kernels of kernels.cuh run: for
// each, its per-channel coefficients or state, how a thread reads its inputs, and how partial
// states merge. Every formula comes from batch_norm_math.h; a kernel decides only which thread
// visits which element.
#pragma once

// Only Tensor's methods and the two factory functions used here, not all of ATen (ATen/ATen.h):
// nvcc parses every header once per architecture, so ATen's thousands of operator declarations
// would dominate the build. ATen's headers enforce the restriction.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS

#include "ckbn.h"
#include "launch_plan.h"
#include "batch_norm_math.h"

#include <cstdint>
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

}  // namespace gpu
}  // namespace ckbn
