"""ckbn.functional.batch_norm against torch.nn.functional.batch_norm, and its checkpoint policy.

The oracle is F.batch_norm on the same arguments: outputs, gradients, the buffers it updates, and
the exceptions it raises. Running buffers passed in training mode are updated once per forward
under any checkpoint, and never by a call that raises.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from helpers import counting

import ckbn

# name: (shape, layout)
INPUTS = {
    "nc": ((6, 3), "contiguous"),
    "ncl": ((4, 3, 7), "contiguous"),
    "nchw": ((3, 4, 5, 6), "contiguous"),
    "nchw_channels_last": ((3, 4, 5, 6), "channels_last"),
    "ncdhw": ((2, 3, 3, 4, 5), "contiguous"),
    "one_channel": ((4, 1, 5, 5), "contiguous"),
    "two_per_channel": ((2, 5, 1, 1), "contiguous"),
    "sliced": ((4, 3, 6), "sliced"),
}
AFFINE = ["weight_and_bias", "weight_only", "none"]
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def make_input(name, dtype, device, seed=0):
    shape, layout = INPUTS[name]
    gen = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        x = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(shape, generator=gen, dtype=dtype)
    x = (x * 2 + 0.5).to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def make_arguments(channels, affine, dtype, device, with_buffers=True):
    """running_mean, running_var, weight, bias, away from their identity defaults."""
    gen = torch.Generator().manual_seed(1)

    def vector(low, high):
        return (torch.rand(channels, generator=gen, dtype=dtype) * (high - low) + low).to(device)

    running = (vector(-0.5, 0.5), vector(0.5, 1.5)) if with_buffers else (None, None)
    weight = vector(0.5, 1.5) if affine != "none" else None
    bias = vector(-0.5, 0.5) if affine == "weight_and_bias" else None
    return running + (weight, bias)


def _clone(tensors):
    return [None if t is None else t.detach().clone() for t in tensors]


def _call_and_grad(batch_norm, x, arguments, training, momentum, eps, grad_output):
    """(output, gradients of input, weight and bias) of one call; the buffers in ``arguments`` are updated."""
    running_mean, running_var, weight, bias = arguments
    leaves = [x.detach().clone().requires_grad_()] + [
        None if p is None else p.detach().clone().requires_grad_() for p in (weight, bias)
    ]
    y = batch_norm(leaves[0], running_mean, running_var, leaves[1], leaves[2], training, momentum, eps)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wanted, grad_output)
    return y.detach(), grads


CASES = [
    pytest.param(True, True, id="train-buffers"),
    pytest.param(True, False, id="train-no_buffers"),
    pytest.param(False, True, id="eval-buffers"),  # eval mode needs the buffers
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("training,with_buffers", CASES)
@pytest.mark.parametrize("name", INPUTS)
def test_matches_torch_functional(device, name, training, with_buffers, affine, dtype):
    x0 = make_input(name, dtype, device)
    ours = make_arguments(x0.size(1), affine, dtype, device, with_buffers)
    theirs = _clone(ours)
    tol = TOLERANCE[dtype]
    for step in range(2):
        x = x0 * (1 + step) - step
        grad_output = torch.randn_like(x)
        y_ours, grads_ours = _call_and_grad(ckbn.functional.batch_norm, x, ours, training, 0.3, 1e-3, grad_output)
        y_theirs, grads_theirs = _call_and_grad(F.batch_norm, x, theirs, training, 0.3, 1e-3, grad_output)
        torch.testing.assert_close(y_ours, y_theirs, **tol)
        assert y_ours.stride() == y_theirs.stride()
        for g_ours, g_theirs in zip(grads_ours, grads_theirs):
            torch.testing.assert_close(g_ours, g_theirs, **tol)
        for buffer_ours, buffer_theirs in zip(ours[:2], theirs[:2]):
            if buffer_theirs is not None:
                torch.testing.assert_close(buffer_ours, buffer_theirs, **tol)


def test_signature_is_torchs():
    ours = inspect.signature(ckbn.functional.batch_norm)
    theirs = inspect.signature(F.batch_norm)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]


def test_keyword_defaults_match_torch():
    x = make_input("nchw", torch.float64, "cpu")
    ours = make_arguments(4, "none", torch.float64, "cpu")[:2]
    theirs = _clone(ours)
    torch.testing.assert_close(ckbn.functional.batch_norm(x, *ours), F.batch_norm(x, *theirs))
    torch.testing.assert_close(
        ckbn.functional.batch_norm(x, *ours, training=True), F.batch_norm(x, *theirs, training=True)
    )
    torch.testing.assert_close(ours, theirs)


def _meta(n):
    return torch.zeros(n, device="meta")


def _has_data(value):
    return isinstance(value, torch.Tensor) and value.device.type != "meta"


# name: (a function of (good input, good arguments) giving the bad call's keyword arguments, whether
# ckbn's message is torch's word for word)
BAD_CALLS = {
    "eps_negative_training": (lambda x, a: dict(a, training=True, eps=-1.0), True),
    "eps_zero_training": (lambda x, a: dict(a, training=True, eps=0.0), True),
    "eps_negative_eval": (lambda x, a: dict(a, eps=-1e-3), True),
    "one_value_per_channel": (lambda x, a: dict(a, input=x[:1, :, :1, :1], training=True), True),
    "eval_without_running_mean": (lambda x, a: dict(a, running_mean=None), True),
    "eval_without_running_var": (lambda x, a: dict(a, running_var=None), True),
    "training_with_one_buffer": (lambda x, a: dict(a, running_var=None, training=True), True),
    "running_mean_size": (lambda x, a: dict(a, running_mean=torch.zeros(5, dtype=x.dtype), training=True), True),
    "running_var_size": (lambda x, a: dict(a, running_var=torch.ones(5, dtype=x.dtype)), True),
    "weight_size": (lambda x, a: dict(a, weight=torch.ones(5, dtype=x.dtype), training=True), True),
    "bias_size": (lambda x, a: dict(a, bias=torch.ones(2, dtype=x.dtype)), True),
    "running_mean_on_meta": (lambda x, a: dict(a, running_mean=_meta(4), training=True), True),
    "weight_on_meta": (lambda x, a: dict(a, weight=_meta(4)), True),
    "momentum_none": (lambda x, a: dict(a, momentum=None, training=True), True),
    # torch names the dtype 'Long', ckbn torch.int64: the exception type is torch's, the message ckbn's.
    "integer_input": (lambda x, a: dict(a, input=x.long(), training=True), False),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_errors_match_torch_and_change_nothing(case):
    make_call, same_message = BAD_CALLS[case]
    x = make_input("nchw", torch.float64, "cpu")
    running_mean, running_var, weight, bias = make_arguments(4, "weight_and_bias", torch.float64, "cpu")
    good = dict(input=x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    call = make_call(x, good)
    ours = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    before = {k: v.clone() for k, v in ours.items() if k.startswith("running") and _has_data(v)}

    with pytest.raises(Exception) as torch_error:
        F.batch_norm(**call)
    with pytest.raises(Exception) as ckbn_error:
        ckbn.functional.batch_norm(**ours)
    assert ckbn_error.type is torch_error.type
    if same_message:
        assert str(ckbn_error.value) == str(torch_error.value)
    for key, value in before.items():
        assert torch.equal(ours[key], value), key


def test_failure_inside_an_op_updates_nothing():
    """float64 weight beside float32 input: the normalize op refuses, after the statistics."""
    x = make_input("nchw", torch.float32, "cpu")
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="weight"):
        ckbn.functional.batch_norm(x, running_mean, running_var, torch.ones(4, dtype=torch.float64), training=True)
    assert torch.equal(running_mean, torch.zeros(4)) and torch.equal(running_var, torch.ones(4))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_updates_nothing(training):
    x = torch.randn(0, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    ours = [torch.zeros(3), torch.ones(3)]
    theirs = _clone(ours)
    y = ckbn.functional.batch_norm(x, *ours, training=training)
    expected = F.batch_norm(x, *theirs, training=training)
    assert y.shape == expected.shape and y.stride() == expected.stride()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, [torch.zeros(3), torch.ones(3)])


class OwnBuffersNet(torch.nn.Module):
    """A custom layer holding its own statistics, as meta-learning code does, around a convolution."""

    def __init__(self, batch_norm):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.rand(6) + 0.5)
        self.bias = torch.nn.Parameter(torch.rand(6) - 0.5)
        self.register_buffer("running_mean", torch.zeros(6))
        self.register_buffer("running_var", torch.ones(6))
        self.batch_norm = batch_norm

    def forward(self, x):
        h = self.batch_norm(self.conv(x), self.running_mean, self.running_var, self.weight, self.bias, True, 0.2)
        return torch.relu(h)


def _steps(net, run, steps=3):
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=gen) * 2 + 1
        run(net, x.requires_grad_()).square().mean().backward()
    return net


CHECKPOINTS = {
    "plain": lambda net, x: net(x),
    "torch_reentrant": lambda net, x: torch_checkpoint.checkpoint(net, x, use_reentrant=True),
    "torch_non_reentrant": lambda net, x: torch_checkpoint.checkpoint(net, x, use_reentrant=False),
    "ckbn": lambda net, x: ckbn.checkpoint(net, x),
}


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_buffers_updated_once_per_forward_under_any_checkpoint(checkpoint):
    oracle = _steps(OwnBuffersNet(F.batch_norm), CHECKPOINTS["plain"])
    net = _steps(OwnBuffersNet(ckbn.functional.batch_norm), CHECKPOINTS[checkpoint])
    for (key, value), expected in zip(net.state_dict().items(), oracle.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, msg=key)
    for p, q in zip(net.parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)


def test_torch_functional_drifts_under_checkpoint():
    """What the test above guards against, shown with torch's own F.batch_norm."""
    oracle = _steps(OwnBuffersNet(F.batch_norm), CHECKPOINTS["plain"])
    net = _steps(OwnBuffersNet(F.batch_norm), CHECKPOINTS["torch_non_reentrant"])
    assert (net.running_mean - oracle.running_mean).abs().max() > 1e-3


def test_ckbn_checkpoint_replays_the_functional_call(monkeypatch):
    seen = []

    def batch_norm_seen(*args):
        seen.append(ckbn.functional.batch_norm(*args))
        return seen[-1]

    net = OwnBuffersNet(batch_norm_seen)
    stats_calls = counting(monkeypatch, "batch_stats")
    update_calls = counting(monkeypatch, "update_running_stats")
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    ckbn.checkpoint(net, x).sum().backward()
    assert len(seen) == 2, "the recompute ran"
    assert torch.equal(seen[0], seen[1]), "the replayed output is bitwise the forward's"
    assert len(stats_calls) == 1 and len(update_calls) == 1


def test_no_channels_is_refused_by_the_ops():
    """torch returns an empty output for C = 0; ckbn's operators need a channel."""
    x = torch.randn(4, 0, 3)
    assert torch.nn.functional.batch_norm(x, None, None, training=True).shape == x.shape
    with pytest.raises(RuntimeError, match="at least one channel"):
        ckbn.functional.batch_norm(x, None, None, training=True)


def test_running_buffers_of_another_dtype_are_accepted():
    """torch's CPU kernel refuses float64 buffers beside float32 input; ckbn averages in the
    statistics dtype and writes each buffer in its own."""
    x = torch.randn(4, 3, 2, 2)
    buffers = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match="mixed dtype"):
        torch.nn.functional.batch_norm(x, *[b.clone() for b in buffers], training=True)
    y = ckbn.functional.batch_norm(x, *buffers, training=True)
    expected_buffers = [torch.zeros(3), torch.ones(3)]
    expected = torch.nn.functional.batch_norm(x, *expected_buffers, training=True)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close([b.float() for b in buffers], expected_buffers)
