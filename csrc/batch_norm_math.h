// The arithmetic of batch normalization, written once.
//
// Every function here is inline and compiles as __host__ __device__ under nvcc, so the CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda) evaluate the very same formulas. Kernels decide only
// how elements are visited; what is computed per element or per channel lives here.
//
// `acc_t` is the accumulation type: float for half, bfloat16 and float input; double for double.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CKBN_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced inline, as under nvcc: the CPU kernels evaluate these templates on vector types compiled
// for a wider target than this header, and only once inlined into such a kernel can the vector
// operators inside be inlined too.
#define CKBN_HOST_DEVICE inline __attribute__((always_inline))
#else
#define CKBN_HOST_DEVICE inline
#endif

namespace ckbn {
namespace math {

// Running moments of one channel: element count, mean and M2 = sum((x - mean)^2).
// The count is 64-bit because N * H * W of one channel can exceed 2^31.
template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;
  int64_t count;
};

template <typename acc_t>
CKBN_HOST_DEVICE Welford<acc_t> welford_empty() {
  return Welford<acc_t>{acc_t(0), acc_t(0), 0};
}

// welford_update of a mean and M2 whose count is kept apart (one count for channels that see as
// many elements): `count` is the count after x.
template <typename acc_t>
CKBN_HOST_DEVICE void welford_update_moments(acc_t& mean, acc_t& m2, acc_t x, int64_t count) {
  const acc_t delta = x - mean;
  mean += delta / static_cast<acc_t>(count);
  m2 += delta * (x - mean);
}

// Welford's single-element update: stable for data far from zero, unlike sum and sum of squares.
template <typename acc_t>
CKBN_HOST_DEVICE Welford<acc_t> welford_update(Welford<acc_t> w, acc_t x) {
  w.count += 1;
  welford_update_moments(w.mean, w.m2, x, w.count);
  return w;
}

// What Chan et al.'s merge of a side of a_count elements with one of b_count takes from the counts
// (a_count + b_count > 0): the same for every channel of a group that shares its counts.
template <typename acc_t>
struct WelfordMergeWeights {
  int64_t count;  // of the merged result
  acc_t a_count;
  acc_t b_share;  // weight of b in the merged mean
};

template <typename acc_t>
CKBN_HOST_DEVICE WelfordMergeWeights<acc_t> welford_merge_weights(int64_t a_count,
                                                                  int64_t b_count) {
  const int64_t count = a_count + b_count;
  // b_share is a ratio so that an empty side contributes exactly 0.
  return WelfordMergeWeights<acc_t>{count, static_cast<acc_t>(a_count),
                                    static_cast<acc_t>(b_count) / static_cast<acc_t>(count)};
}

// Merges b's mean and M2 into a's, with the weights of their counts.
template <typename acc_t>
CKBN_HOST_DEVICE void welford_merge_moments(acc_t& a_mean, acc_t& a_m2, acc_t b_mean, acc_t b_m2,
                                            const WelfordMergeWeights<acc_t>& w) {
  const acc_t delta = b_mean - a_mean;
  a_mean = a_mean + delta * w.b_share;
  a_m2 = a_m2 + b_m2 + delta * delta * w.a_count * w.b_share;
}

// Chan et al.'s merge of two partial results; either side may be empty.
template <typename acc_t>
CKBN_HOST_DEVICE Welford<acc_t> welford_merge(Welford<acc_t> a, Welford<acc_t> b) {
  if (a.count + b.count == 0) {
    return a;
  }
  const auto w = welford_merge_weights<acc_t>(a.count, b.count);
  welford_merge_moments(a.mean, a.m2, b.mean, b.m2, w);
  a.count = w.count;
  return a;
}

// A whole chunk summarised by its exact count, mean and M2 (as a vectorised CPU loop computes it
// with two passes over data in cache), so that chunks merge exactly like single elements.
template <typename acc_t>
CKBN_HOST_DEVICE Welford<acc_t> welford_from_moments(int64_t count, acc_t mean, acc_t m2) {
  return Welford<acc_t>{mean, m2, count};
}

// A chunk of `count` (> 0) elements summarised around `shift`, an approximate mean (a first pass's
// rounded one): sum_d = sum(x - shift), sum_d2 = sum((x - shift)^2). The sum_d terms correct the
// mean and M2 for the error in shift, so the result does not depend on how good shift was.
template <typename acc_t>
CKBN_HOST_DEVICE Welford<acc_t> welford_from_shifted_sums(int64_t count, acc_t shift, acc_t sum_d,
                                                          acc_t sum_d2) {
  const acc_t mean_d = sum_d / static_cast<acc_t>(count);
  const acc_t m2 = sum_d2 - sum_d * mean_d;
  return welford_from_moments(count, shift + mean_d, m2 > acc_t(0) ? m2 : acc_t(0));
}

// Biased variance of the merged moments; an empty channel has variance 0 rather than NaN.
template <typename acc_t>
CKBN_HOST_DEVICE acc_t welford_biased_var(Welford<acc_t> w) {
  return w.count > 0 ? w.m2 / static_cast<acc_t>(w.count) : acc_t(0);
}

template <typename acc_t>
CKBN_HOST_DEVICE acc_t invstd_from_var(acc_t biased_var, acc_t eps) {
  using std::sqrt;
  return acc_t(1) / sqrt(biased_var + eps);
}

// The per-channel affine transform that normalize applies: y = (x - mean) * scale + shift.
// (x - mean) is formed first: folding mean into the shift would cancel catastrophically for data
// far from zero.
template <typename acc_t>
struct NormalizeCoeffs {
  acc_t mean;
  acc_t scale;  // invstd * weight
  acc_t shift;  // bias
};

template <typename acc_t>
CKBN_HOST_DEVICE NormalizeCoeffs<acc_t> normalize_coeffs(acc_t mean, acc_t invstd, acc_t weight,
                                                         acc_t bias) {
  return NormalizeCoeffs<acc_t>{mean, invstd * weight, bias};
}

template <typename acc_t>
CKBN_HOST_DEVICE acc_t normalize_element(acc_t x, NormalizeCoeffs<acc_t> c) {
  return (x - c.mean) * c.scale + c.shift;
}

// ---------------------------------------------------------------------------------------------
// Fused activations: y = act((x - mean) * scale + shift). The definitions and derivatives are
// torch's (src/ckbn/activations.py), kinks included. Each is written once for any lane type T:
// acc_t here and in CUDA, a vector of acc_t in the CPU loops (which specialise Lanes for it).

enum class Activation : int { Identity, Relu, Relu6, LeakyRelu, Silu, Hardswish };

// The element operations beyond arithmetic that activations use, for scalar lanes.
template <typename T>
struct Lanes {
  // where(mask, a, b), the mask being what a comparison of two T gives.
  static CKBN_HOST_DEVICE T select(bool mask, T a, T b) { return mask ? a : b; }
  static CKBN_HOST_DEVICE T exp(T a) {
    using std::exp;
    return exp(a);
  }
};

// act(z). `slope` is leaky_relu's negative slope, unused by the others. The comparisons are
// ordered so that NaN propagates, as in torch.
template <Activation act, typename T>
CKBN_HOST_DEVICE T activate(T z, T slope) {
  using L = Lanes<T>;
  const T zero(0.0f);
  if constexpr (act == Activation::Identity) {
    return z;
  } else if constexpr (act == Activation::Relu) {
    return L::select(z < zero, zero, z);
  } else if constexpr (act == Activation::Relu6) {
    const T six(6.0f);
    return L::select(z < zero, zero, L::select(z > six, six, z));
  } else if constexpr (act == Activation::LeakyRelu) {
    return L::select(z > zero, z, z * slope);
  } else if constexpr (act == Activation::Silu) {
    return z / (T(1.0f) + L::exp(zero - z));
  } else {
    static_assert(act == Activation::Hardswish, "an Activation without a definition");
    const T six(6.0f);
    const T shifted = z + T(3.0f);
    return z * L::select(shifted < zero, zero, L::select(shifted > six, six, shifted)) / six;
  }
}

// dy * act'(z): the gradient with respect to the pre-activation z, with torch's backward values at
// the kinks (relu: 0 at 0; relu6: 0 at 0 and 6; hardswish: 0 at -3, 1 at 3).
template <Activation act, typename T>
CKBN_HOST_DEVICE T activation_grad(T dy, T z, T slope) {
  using L = Lanes<T>;
  const T zero(0.0f);
  if constexpr (act == Activation::Identity) {
    return dy;
  } else if constexpr (act == Activation::Relu) {
    return L::select(z > zero, dy, zero);
  } else if constexpr (act == Activation::Relu6) {
    return L::select(z > zero, L::select(z < T(6.0f), dy, zero), zero);
  } else if constexpr (act == Activation::LeakyRelu) {
    return L::select(z > zero, dy, dy * slope);
  } else if constexpr (act == Activation::Silu) {
    const T one(1.0f);
    const T sigmoid = one / (one + L::exp(zero - z));
    return dy * sigmoid * (one + z * (one - sigmoid));
  } else {
    static_assert(act == Activation::Hardswish, "an Activation without a derivative");
    const T three(3.0f);
    return L::select(z > zero - three, L::select(z < three, dy * (z / three + T(0.5f)), dy), zero);
  }
}

// The normalize op's element: the activation of the normalized value.
template <Activation act, typename T>
CKBN_HOST_DEVICE T normalize_activate(T x, NormalizeCoeffs<T> c, T slope) {
  return activate<act>(normalize_element(x, c), slope);
}

// Calls fn(std::integral_constant<Activation, act>()) for the runtime `act`, so that kernels take
// the activation as a template parameter and the identity path stays the plain one.
template <typename Fn>
inline auto visit_activation(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::Relu:
      return fn(std::integral_constant<Activation, Activation::Relu>());
    case Activation::Relu6:
      return fn(std::integral_constant<Activation, Activation::Relu6>());
    case Activation::LeakyRelu:
      return fn(std::integral_constant<Activation, Activation::LeakyRelu>());
    case Activation::Silu:
      return fn(std::integral_constant<Activation, Activation::Silu>());
    case Activation::Hardswish:
      return fn(std::integral_constant<Activation, Activation::Hardswish>());
    case Activation::Identity:
    default:
      return fn(std::integral_constant<Activation, Activation::Identity>());
  }
}

// Backward of y = (x - mean) * invstd * weight + bias with respect to x.
//
// In training mode mean and invstd are functions of x, which adds two per-channel terms:
//   dx = (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))) * invstd * weight.
// In eval mode they are constants and dx = dy * invstd * weight; the same element formula serves
// both with mean_dy = projection = 0.
template <typename acc_t>
struct BackwardCoeffs {
  acc_t mean;
  acc_t mean_dy;     // sum(dy) / count, or 0 in eval mode
  acc_t projection;  // invstd^2 * sum(dy * (x - mean)) / count, or 0 in eval mode
  acc_t scale;       // invstd * weight
  acc_t shift;       // bias: with mean and scale, gives back a fused activation's input
};

// mean_dy and mean_dy_xmu are sum(dy) / count and sum(dy * (x - mean)) / count over the whole
// (possibly multi-process) batch.
template <typename acc_t>
CKBN_HOST_DEVICE BackwardCoeffs<acc_t> backward_coeffs(acc_t mean, acc_t invstd, acc_t weight,
                                                       acc_t mean_dy, acc_t mean_dy_xmu, bool train,
                                                       acc_t bias = acc_t(0)) {
  BackwardCoeffs<acc_t> c;
  c.mean = mean;
  c.mean_dy = train ? mean_dy : acc_t(0);
  c.projection = train ? invstd * invstd * mean_dy_xmu : acc_t(0);
  c.scale = invstd * weight;
  c.shift = bias;
  return c;
}

template <typename acc_t>
CKBN_HOST_DEVICE acc_t backward_element(acc_t dy, acc_t x, BackwardCoeffs<acc_t> c) {
  return (dy - c.mean_dy - (x - c.mean) * c.projection) * c.scale;
}

// A fused layer's backward: dz = dy * act'(z), z recomputed from x and the normalize coefficients,
// then the batch-norm backward of dz. The sums (sum(dz), sum(dz * (x - mean))) are of dz as well.
template <Activation act, typename T>
CKBN_HOST_DEVICE T pre_activation_grad(T dy, T x, NormalizeCoeffs<T> c, T slope) {
  if constexpr (act == Activation::Identity) {
    return dy;
  } else {
    return activation_grad<act>(dy, normalize_element(x, c), slope);
  }
}

template <Activation act, typename T>
CKBN_HOST_DEVICE T fused_backward_element(T dy, T x, BackwardCoeffs<T> c, T slope) {
  const NormalizeCoeffs<T> z{c.mean, c.scale, c.shift};
  return backward_element(pre_activation_grad<act>(dy, x, z, slope), x, c);
}

// grad_weight = sum(dy * x_hat) = sum(dy * (x - mean)) * invstd; grad_bias = sum(dy).
template <typename acc_t>
CKBN_HOST_DEVICE acc_t grad_weight_from_sums(acc_t sum_dy_xmu, acc_t invstd) {
  return sum_dy_xmu * invstd;
}

// One channel's running-statistics update, as torch.nn.BatchNorm does it:
//   running_mean = (1 - factor) * running_mean + factor * batch_mean
//   running_var  = (1 - factor) * running_var  + factor * unbiased_batch_var
// The batch variance is recovered from invstd; count / (count - 1) is Bessel's correction.
// count must be at least 2 (the module refuses a single value per channel in training).
template <typename acc_t>
CKBN_HOST_DEVICE acc_t unbiased_var_from_invstd(acc_t invstd, acc_t eps, int64_t count) {
  const acc_t biased_var = acc_t(1) / (invstd * invstd) - eps;
  const acc_t positive_var = biased_var > acc_t(0) ? biased_var : acc_t(0);
  return positive_var * static_cast<acc_t>(count) / static_cast<acc_t>(count - 1);
}

template <typename acc_t>
CKBN_HOST_DEVICE acc_t running_average(acc_t running, acc_t batch, acc_t factor) {
  return (acc_t(1) - factor) * running + factor * batch;
}

// The factor for one update: momentum, or for momentum=None the cumulative average 1 / n, where n
// is num_batches_tracked after this batch was counted.
template <typename acc_t>
CKBN_HOST_DEVICE acc_t average_factor(bool has_momentum, acc_t momentum, int64_t batches_tracked) {
  return has_momentum ? momentum : acc_t(1) / static_cast<acc_t>(batches_tracked);
}

}  // namespace math
}  // namespace ckbn
