// One BatchNorm2d training step and an eval forward from C++, with the ckbn operators called
// through the dispatcher. Linking libckbn.so registers them; no Python is involved.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <optional>
#include <tuple>

using at::Tensor;

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto batch_stats = dispatcher.findSchemaOrThrow("ckbn::batch_stats", "")
                               .typed<std::tuple<Tensor, Tensor>(const Tensor&, double)>();
  const auto normalize =
      dispatcher.findSchemaOrThrow("ckbn::normalize", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                        const std::optional<Tensor>&, c10::string_view, double)>();
  const auto update_running_stats =
      dispatcher.findSchemaOrThrow("ckbn::update_running_stats", "")
          .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      std::optional<double>, double, int64_t)>();
  const auto backward =
      dispatcher.findSchemaOrThrow("ckbn::backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    const std::optional<Tensor>&, bool, std::array<bool, 3>,
                                                    const std::optional<Tensor>&, c10::string_view, double)>();

  const int64_t channels = 8;
  const double eps = 1e-5, momentum = 0.1;
  Tensor weight = at::ones({channels}), bias = at::zeros({channels});
  Tensor running_mean = at::zeros({channels}), running_var = at::ones({channels});
  Tensor num_batches_tracked = at::zeros({}, at::kLong);

  at::manual_seed(0);
  const Tensor x = at::randn({4, channels, 16, 16}).contiguous(at::MemoryFormat::ChannelsLast);

  // Training forward: batch statistics, normalize, then count the batch in the running statistics.
  const auto [mean, invstd] = batch_stats.call(x, eps);
  const Tensor y = normalize.call(x, mean, invstd, weight, bias, "identity", 0.0);
  update_running_stats.call(running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps,
                            x.numel() / channels);

  // A checkpoint's recompute normalizes with the recorded statistics: the same output, bit for bit.
  const bool replay_exact = at::equal(normalize.call(x, mean, invstd, weight, bias, "identity", 0.0), y);

  // Backward of loss = sum(y * g): the gradients with respect to input, weight and bias.
  const Tensor g = at::randn_like(y);
  const auto [grad_input, grad_weight, grad_bias] = backward.call(g, x, mean, invstd, weight, true, {true, true, true},
                                                                      bias, "identity", 0.0);

  // Eval forward with the running statistics.
  const Tensor y_eval = normalize.call(x, running_mean, (running_var + eps).rsqrt(), weight, bias, "identity", 0.0);

  std::cout << "output channels_last: " << y.is_contiguous(at::MemoryFormat::ChannelsLast)
            << "\nreplay bitwise equal: " << replay_exact
            << "\nbatches tracked: " << num_batches_tracked.item<int64_t>()
            << "\nrunning_mean[0]: " << running_mean[0].item<float>()
            << "\ngrad_weight norm: " << grad_weight.norm().item<float>()
            << "\neval output mean: " << y_eval.mean().item<float>() << "\n";
  return replay_exact && num_batches_tracked.item<int64_t>() == 1 ? 0 : 1;
}
