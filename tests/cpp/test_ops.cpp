// The ckbn operators called from C++ through the dispatcher, checked against libtorch's own
// batch norm (at::native_batch_norm and at::native_batch_norm_backward) on CPU.
//
// A plain executable registered with ctest: `test_ops` runs every case, `test_ops NAME` one case.
// A failed check throws; the case is reported and the exit status is the number of failed cases.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstring>
#include <functional>
#include <iostream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The C++ signatures the kernels are registered with (csrc/cpu/batch_norm.cpp).
using BatchStatsFn = std::tuple<Tensor, Tensor>(const Tensor&, double);
using NormalizeFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                           const OptTensor&, c10::string_view, double);
using UpdateRunningStatsFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, std::optional<double>, double, int64_t);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const OptTensor&, bool,
                                                      std::array<bool, 3>, const OptTensor&,
                                                      c10::string_view, double);
using BackwardReduceFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&);
using BackwardElemtFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const OptTensor&, const Tensor&, const Tensor&);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

constexpr double kEps = 1e-5;
constexpr double kMomentum = 0.1;

void check(bool ok, const std::string& what) {
  if (!ok) {
    throw std::runtime_error(what);
  }
}

// |actual - expected| <= atol + rtol * |expected| elementwise, after upcasting both to double.
void check_close(const Tensor& actual, const Tensor& expected, double rtol, double atol,
                 const std::string& what) {
  check(actual.sizes() == expected.sizes(),
        what + ": shape " + c10::str(actual.sizes()) + " != " + c10::str(expected.sizes()));
  check(actual.scalar_type() == expected.scalar_type(),
        what + ": dtype " + c10::toString(actual.scalar_type()) +
            " != " + c10::toString(expected.scalar_type()));
  const Tensor a = actual.to(at::kDouble);
  const Tensor e = expected.to(at::kDouble);
  if (!at::allclose(a, e, rtol, atol)) {
    const double diff = (a - e).abs().max().item<double>();
    throw std::runtime_error(what + ": max abs difference " + std::to_string(diff) + " (rtol " +
                             std::to_string(rtol) + ", atol " + std::to_string(atol) + ")");
  }
}

// One input configuration: device, input dtype, and whether the input is channels_last. Parameters
// and running statistics are float32 for bfloat16 input (as under autocast), else the input's
// dtype.
struct Config {
  at::Device device;
  at::ScalarType dtype;
  bool channels_last;
  double rtol;
  double atol;

  std::string name() const {
    return device.str() + "/" + c10::toString(dtype) +
           (channels_last ? "/channels_last" : "/contiguous");
  }
  at::TensorOptions param_options() const {
    return at::TensorOptions().device(device).dtype(dtype == at::kDouble ? at::kDouble
                                                                         : at::kFloat);
  }
};

// Every dtype and layout on CPU, and on CUDA too when a GPU is present and ckbn was built with
// CUDA kernels.
std::vector<Config> configs() {
  std::vector<at::Device> devices = {at::kCPU};
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("ckbn::batch_stats", "");
  if (at::hasCUDA() && handle.hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
    devices.emplace_back(at::kCUDA);
  }
  std::vector<Config> out;
  for (const at::Device& device : devices) {
    for (const bool channels_last : {false, true}) {
      out.push_back({device, at::kFloat, channels_last, 1e-5, 1e-5});
      out.push_back({device, at::kDouble, channels_last, 1e-10, 1e-10});
      out.push_back({device, at::kBFloat16, channels_last, 1e-2, 2e-2});
    }
  }
  return out;
}

// A (4, 3, 5, 7) batch with per-channel offsets and scales, so that a statistics bug shows.
Tensor make_input(const Config& c) {
  const auto shape_c = std::vector<int64_t>{1, 3, 1, 1};
  Tensor x = at::randn({4, 3, 5, 7}, at::kDouble) *
                 at::tensor({0.5, 2.0, 3.0}, at::kDouble).view(shape_c) +
             at::tensor({-1.0, 4.0, 10.0}, at::kDouble).view(shape_c);
  x = x.to(c.device, c.dtype);
  return c.channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
}

struct Params {
  Tensor weight, bias, running_mean, running_var;
};

Params make_params(const Config& c) {
  const auto opts = c.param_options();
  return {at::rand({3}, opts) + 0.5, at::randn({3}, opts), at::randn({3}, opts),
          at::rand({3}, opts) + 0.5};
}

Params clone(const Params& p) {
  return {p.weight.clone(), p.bias.clone(), p.running_mean.clone(), p.running_var.clone()};
}

void for_each_config(const std::function<void(const Config&)>& body) {
  for (const Config& c : configs()) {
    try {
      body(c);
    } catch (const std::exception& e) {
      throw std::runtime_error(c.name() + ": " + e.what());
    }
  }
}

// Training forward: statistics, output and memory format as libtorch's training batch norm.
void training_forward_matches_native() {
  for_each_config([](const Config& c) {
    const Tensor x = make_input(c);
    const Params p = make_params(c);
    const Params native = clone(p);
    const auto [expected, save_mean, save_invstd] =
        at::native_batch_norm(x, native.weight, native.bias, native.running_mean,
                              native.running_var, true, kMomentum, kEps);

    const auto [mean, invstd] = op<BatchStatsFn>("ckbn::batch_stats").call(x, kEps);
    check_close(mean, save_mean, 1e-6, 1e-6, "mean");
    check_close(invstd, save_invstd, 1e-5, 1e-6, "invstd");
    const Tensor y =
        op<NormalizeFn>("ckbn::normalize").call(x, mean, invstd, p.weight, p.bias, "identity", 0.0);
    check_close(y, expected, c.rtol, c.atol, "output");
    const auto format =
        c.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    check(y.is_contiguous(format), "output keeps the input's memory format");
  });
}

// Running statistics, with momentum and with momentum=None (the cumulative average, which torch's
// module passes to native_batch_norm as 1 / num_batches_tracked).
void update_running_stats_matches_native() {
  for_each_config([](const Config& c) {
    Params p = make_params(c);
    Params native = clone(p);
    Tensor batches = at::zeros({}, c.param_options().dtype(at::kLong));
    for (int step = 1; step <= 3; ++step) {
      const std::optional<double> momentum =
          step == 2 ? std::nullopt : std::optional<double>(kMomentum);
      const Tensor x = make_input(c);
      at::native_batch_norm(x, native.weight, native.bias, native.running_mean, native.running_var,
                            true, momentum.value_or(1.0 / step), kEps);
      const auto [mean, invstd] = op<BatchStatsFn>("ckbn::batch_stats").call(x, kEps);
      op<UpdateRunningStatsFn>("ckbn::update_running_stats")
          .call(p.running_mean, p.running_var, batches, mean, invstd, momentum, kEps,
                x.numel() / x.size(1));
      check(batches.item<int64_t>() == step, "num_batches_tracked counts every update");
      check_close(p.running_mean, native.running_mean, 1e-5, 1e-6,
                  "running_mean, step " + std::to_string(step));
      check_close(p.running_var, native.running_var, 1e-5, 1e-6,
                  "running_var, step " + std::to_string(step));
    }
  });
}

// Gradients in training mode (statistics of the batch) and eval mode (running statistics).
void backward_matches_native() {
  for_each_config([](const Config& c) {
    for (const bool train : {true, false}) {
      const Tensor x = make_input(c);
      const Tensor grad_out = at::randn_like(x);
      const Params p = make_params(c);
      Tensor mean, invstd;
      if (train) {
        std::tie(mean, invstd) = op<BatchStatsFn>("ckbn::batch_stats").call(x, kEps);
      } else {
        mean = p.running_mean;
        invstd = (p.running_var + kEps).rsqrt();
      }
      const auto [e_input, e_weight, e_bias] =
          at::native_batch_norm_backward(grad_out, x, p.weight, p.running_mean, p.running_var, mean,
                                         invstd, train, kEps, {true, true, true});
      const auto [g_input, g_weight, g_bias] =
          op<BackwardFn>("ckbn::backward")
              .call(grad_out, x, mean, invstd, p.weight, train, {true, true, true}, p.bias,
                    "identity", 0.0);
      const std::string mode = train ? "train " : "eval ";
      check_close(g_input, e_input, c.rtol, c.atol, mode + "grad_input");
      check_close(g_weight, e_weight, c.rtol, c.atol * 10, mode + "grad_weight");
      check_close(g_bias, e_bias, c.rtol, c.atol * 10, mode + "grad_bias");
      const auto format =
          c.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
      check(g_input.is_contiguous(format), mode + "grad_input keeps the input's memory format");
    }
  });
}

// backward_reduce then backward_elemt (the split SyncBatchNorm uses) gives the fused gradient.
void backward_halves_match_fused() {
  for_each_config([](const Config& c) {
    const Tensor x = make_input(c);
    const Tensor grad_out = at::randn_like(x);
    const Params p = make_params(c);
    const auto [mean, invstd] = op<BatchStatsFn>("ckbn::batch_stats").call(x, kEps);
    const auto [fused, grad_weight, grad_bias] =
        op<BackwardFn>("ckbn::backward")
            .call(grad_out, x, mean, invstd, p.weight, true, {true, false, false}, p.bias,
                  "identity", 0.0);
    const auto [sum_dy, sum_dy_xmu] =
        op<BackwardReduceFn>("ckbn::backward_reduce").call(grad_out, x, mean);
    const double count = static_cast<double>(x.numel() / x.size(1));
    const Tensor split =
        op<BackwardElemtFn>("ckbn::backward_elemt")
            .call(grad_out, x, mean, invstd, p.weight, sum_dy / count, sum_dy_xmu / count);
    check_close(split, fused, c.rtol, c.atol, "grad_input of backward_elemt");
    check(grad_weight.numel() == 0 && grad_bias.numel() == 0, "masked gradients are empty");
  });
}

// A checkpoint's recompute normalizes with the statistics recorded in the forward: the output must
// be the training forward's, bit for bit, and the running-statistics update in between must not
// disturb the recorded statistics.
void replayed_normalize_is_bitwise_equal() {
  for_each_config([](const Config& c) {
    const Tensor x = make_input(c);
    Params p = make_params(c);
    const auto [mean, invstd] = op<BatchStatsFn>("ckbn::batch_stats").call(x, kEps);
    const Tensor recorded_mean = mean.clone();
    const Tensor recorded_invstd = invstd.clone();
    const auto normalize = op<NormalizeFn>("ckbn::normalize");
    const Tensor forward = normalize.call(x, mean, invstd, p.weight, p.bias, "identity", 0.0);
    Tensor batches = at::zeros({}, c.param_options().dtype(at::kLong));
    op<UpdateRunningStatsFn>("ckbn::update_running_stats")
        .call(p.running_mean, p.running_var, batches, mean, invstd, kMomentum, kEps,
              x.numel() / x.size(1));
    check(at::equal(mean, recorded_mean) && at::equal(invstd, recorded_invstd),
          "update_running_stats leaves the batch statistics alone");
    const Tensor replayed =
        normalize.call(x, recorded_mean, recorded_invstd, p.weight, p.bias, "identity", 0.0);
    check(at::equal(replayed, forward), "replayed output equals the training forward bitwise");
    check(replayed.strides() == forward.strides(), "replayed output has the forward's strides");
  });
}

const std::vector<std::pair<const char*, void (*)()>> kCases = {
    {"training_forward_matches_native", training_forward_matches_native},
    {"update_running_stats_matches_native", update_running_stats_matches_native},
    {"backward_matches_native", backward_matches_native},
    {"backward_halves_match_fused", backward_halves_match_fused},
    {"replayed_normalize_is_bitwise_equal", replayed_normalize_is_bitwise_equal},
};

}  // namespace

int main(int argc, char** argv) {
  int failed = 0;
  int ran = 0;
  for (const auto& [name, run] : kCases) {
    if (argc > 1 && std::strcmp(argv[1], name) != 0) {
      continue;
    }
    ++ran;
    at::manual_seed(0);
    try {
      run();
      std::cout << "[  PASSED  ] " << name << "\n";
    } catch (const std::exception& e) {
      ++failed;
      std::cout << "[  FAILED  ] " << name << ": " << e.what() << "\n";
    }
  }
  if (ran == 0) {
    std::cerr << "no test case named " << argv[1] << "\n";
    return 2;
  }
  std::cout << ran - failed << " passed, " << failed << " failed\n";
  return failed;
}
