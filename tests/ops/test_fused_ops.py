"""normalize and backward with a fused activation, against ckbn.reference and torch in float64.

The oracle is torch's own batch norm followed by torch's own activation, differentiated by autograd
in float64. Shapes, layouts, dtypes and tolerances are those of test_ops.py.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import counting
from test_ops import CASES, DTYPES, EPS, affine, assert_close, assert_like_input, make_input, stats_dtype

import ckbn
from ckbn import activations, ops, reference
from ckbn.autograd import BatchNormFunction
from ckbn.policy import batch_norm_forward

# (name, param): every fusable activation; leaky_relu with torch's default, a steep and a negative slope.
FUSED = [
    ("identity", 0.0),
    ("relu", 0.0),
    ("relu6", 0.0),
    ("leaky_relu", 0.01),
    ("leaky_relu", 1.7),
    ("leaky_relu", -0.5),
    ("silu", 0.0),
    ("hardswish", 0.0),
]


def fused_params(selected):
    return pytest.mark.parametrize(
        "activation,param", selected, ids=[name if name != "leaky_relu" else f"{name}({p})" for name, p in selected]
    )


fused = fused_params(FUSED)
# The wide shape x layout x dtype product takes one leaky_relu slope; the others are tested below.
fused_wide = fused_params([case for case in FUSED if case[0] != "leaky_relu" or case[1] < 0])
trains = pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
# test_ops.py's cases, without the reversed-strides copies, which reach the kernels as contiguous input.
FUSED_CASES = [case for case in CASES if not case.id.endswith("-reversed")]


def fused_inputs(shape, layout, dtype, device):
    # The bias spreads the pre-activations over every piece of each activation (relu6's 6, hardswish's +-3).
    x = make_input(shape, layout, dtype, device)
    dy = make_input(shape, layout, dtype, device, scale=1.0, offset=0.1, seed=7)
    weight = affine("input_dtype", shape[1], dtype, device, seed=1) * 2
    bias = affine("input_dtype", shape[1], dtype, device, seed=2) * 2
    mean, invstd = ops.batch_stats(x, EPS)
    return x, dy, weight, bias, mean, invstd


def oracle(x, dy, weight, bias, mean, invstd, train, activation, param):
    """torch's batch norm then torch's activation, in float64 on the CPU: output and (grad_input,
    grad_weight, grad_bias). On the CPU because torch's CUDA hardswish multiplies by 1/6 rounded to
    float32, 3e-8 from the float64 value (seen on an H200, torch 2.11)."""
    x64 = x.double().cpu().requires_grad_()
    w64 = weight.double().cpu().requires_grad_()
    b64 = bias.double().cpu().requires_grad_()
    if train:
        z = F.batch_norm(x64, None, None, w64, b64, training=True, eps=EPS)
    else:
        var = 1.0 / invstd.double().cpu() ** 2 - EPS
        z = F.batch_norm(x64, mean.double().cpu(), var, w64, b64, training=False, eps=EPS)
    y = activations.apply(z, activation, param)
    y.backward(dy.double().cpu())
    return y.detach(), (x64.grad, w64.grad, b64.grad)


@trains
@fused_wide
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", FUSED_CASES)
def test_fused_normalize_and_backward(shape, layout, dtype, activation, param, train, device):
    """Training: batch statistics; eval: other (running) statistics, held constant by the backward."""
    x, dy, weight, bias, mean, invstd = fused_inputs(shape, layout, dtype, device)
    if not train:
        mean = mean + 0.25
        invstd = invstd * 0.8
    y = ops.normalize(x, mean, invstd, weight, bias, activation, param)
    mask = [True, True, True]
    grads = ops.backward(dy, x, mean, invstd, weight, train, mask, bias, activation, param)
    expected_y, expected = oracle(x, dy, weight, bias, mean, invstd, train, activation, param)
    assert_like_input(y, x)
    assert_close(y, reference.normalize(x, mean, invstd, weight, bias, activation, param), dtype)
    assert_close(y, expected_y, dtype)
    ref_grads = reference.backward(dy, x, mean, invstd, weight, train, mask, bias, activation, param)
    assert_like_input(grads[0], x)
    for actual, ref, exact in zip(grads, ref_grads, expected):
        assert actual.dtype == ref.dtype
        assert_close(actual, ref, dtype)
        assert_close(actual, exact, dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 70, 70), (4, 8, 64, 64)], ids=str)
@fused_params([("relu", 0.0), ("silu", 0.0)])
def test_fused_inputs_split_into_chunks_and_threads(activation, param, shape, layout, threads, device):
    """Inputs big enough that the kernels merge several chunks per channel and split work between threads."""
    x, dy, weight, bias, mean, invstd = fused_inputs(shape, layout, torch.float32, device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ops.normalize(x, mean, invstd, weight, bias, activation, param)
        grads = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True], bias, activation, param)
    finally:
        torch.set_num_threads(previous)
    expected_y, expected = oracle(x, dy, weight, bias, mean, invstd, True, activation, param)
    assert_close(y, expected_y, torch.float32)
    for actual, exact in zip(grads, expected):
        torch.testing.assert_close(actual.double().cpu(), exact.cpu(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "mask", [[True, False, False], [False, True, False], [False, False, True], [False, True, True]], ids=str
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation,param", [("relu", 0.0), ("silu", 0.0)], ids=["relu", "silu"])
def test_backward_fused_output_mask(activation, param, layout, mask, device):
    x, dy, weight, bias, mean, invstd = fused_inputs((3, 4, 5, 6), layout, torch.float32, device)
    grads = ops.backward(dy, x, mean, invstd, weight, True, mask, bias, activation, param)
    _, expected = oracle(x, dy, weight, bias, mean, invstd, True, activation, param)
    for needed, actual, exact in zip(mask, grads, expected):
        if needed:
            assert_close(actual, exact, torch.float32)
        else:
            assert actual.shape == (0,)


@fused
def test_fused_without_affine(activation, param, device):
    """No weight and no bias: the activation's input is the plain normalized value."""
    x, dy, _, _, mean, invstd = fused_inputs((4, 3, 5, 5), "channels_last", torch.float64, device)
    ones, zeros = torch.ones(3, dtype=torch.float64, device=device), torch.zeros(3, dtype=torch.float64, device=device)
    y = ops.normalize(x, mean, invstd, None, None, activation, param)
    grads = ops.backward(dy, x, mean, invstd, None, True, [True, True, True], None, activation, param)
    expected_y, expected = oracle(x, dy, ones, zeros, mean, invstd, True, activation, param)
    assert_close(y, expected_y, torch.float64)
    for actual, exact in zip(grads, expected):
        assert_close(actual, exact, torch.float64)


@fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_kinks_as_torch(activation, param, dtype, device):
    """At the kinks (0, 6, +-3) and around them, values and derivatives are torch's own on the CPU,
    exactly (see oracle for its CUDA hardswish)."""
    points = torch.tensor([-6.0, -3.5, -3.0, -2.5, -1.0, -0.0, 0.0, 0.5, 1.0, 2.5, 3.0, 3.5, 5.0, 6.0, 7.0])
    x = points.to(dtype).reshape(1, -1).expand(2, -1).contiguous().to(device)  # (N=2, C=15), z == x
    channels = x.size(1)
    stats = stats_dtype(dtype)
    mean = torch.zeros(channels, dtype=stats, device=device)
    invstd = torch.ones(channels, dtype=stats, device=device)
    dy = torch.ones_like(x)
    y = ops.normalize(x, mean, invstd, None, None, activation, param)
    grad_input = ops.backward(dy, x, mean, invstd, None, False, [True, False, False], None, activation, param)[0]
    x_leaf = x.cpu().clone().requires_grad_()
    expected = activations.apply(x_leaf, activation, param)
    expected.backward(dy.cpu())
    y, grad_input = y.cpu(), grad_input.cpu()
    torch.testing.assert_close(y, expected.detach(), rtol=2 * torch.finfo(dtype).eps, atol=0)
    if activation == "silu":  # smooth: its derivative is a rounded formula, not a piece's constant
        torch.testing.assert_close(grad_input, x_leaf.grad, rtol=4 * torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(grad_input, x_leaf.grad)


@fused
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (2, 3, 0)], ids=str)
def test_fused_empty_batch(shape, activation, param, device):
    x = torch.empty(shape, device=device)
    mean, invstd = ops.batch_stats(x, EPS)
    vec = torch.ones(3, device=device)
    assert ops.normalize(x, mean, invstd, vec, vec, activation, param).shape == shape
    grad_input, grad_weight, grad_bias = ops.backward(x, x, mean, invstd, vec, True, [True] * 3, vec, activation, param)
    assert grad_input.shape == shape
    assert torch.equal(grad_weight.cpu(), torch.zeros(3)) and torch.equal(grad_bias.cpu(), torch.zeros(3))


# --------------------------------------------------------------------------------------------
# The autograd Function: gradcheck, and replay under ckbn.checkpoint


@trains
@fused
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_fused(layout, activation, param, train, device):
    x, _, weight, bias, mean, invstd = fused_inputs((3, 4, 3, 5), layout, torch.float64, device)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]

    def forward(x, weight, bias):
        if train:
            batch_mean, batch_invstd = ops.batch_stats(x.detach(), EPS)
            return BatchNormFunction.apply(x, weight, bias, batch_mean, batch_invstd, True, EPS, activation, param)
        return BatchNormFunction.apply(x, weight, bias, mean, invstd, False, EPS, activation, param)

    assert torch.autograd.gradcheck(forward, leaves, eps=1e-6, atol=1e-6)


class FusedBatchNorm2d(ckbn.BatchNorm2d):
    """A BatchNorm2d whose forward fuses an activation (the modules live in ckbn.modules)."""

    def __init__(self, channels, activation, param):
        super().__init__(channels)
        self.activation, self.param = activation, param

    def forward(self, input):
        return batch_norm_forward(self, input, activation=self.activation, activation_param=self.param)


@fused
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_checkpoint_replays_fused_bitwise(memory_format, activation, param, monkeypatch):
    torch.manual_seed(0)
    outputs = []
    bn = FusedBatchNorm2d(8, activation, param)
    bn.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    # tanh saves its output, so that the recompute (which stops after the last saved tensor) runs past bn.
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bn, torch.nn.Tanh()).to(memory_format=memory_format)
    plain_block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), FusedBatchNorm2d(8, activation, param), torch.nn.Tanh())
    plain_block.to(memory_format=memory_format).load_state_dict(block.state_dict())
    x = torch.randn(4, 3, 9, 9).contiguous(memory_format=memory_format).requires_grad_()
    stats_calls = counting(monkeypatch, "batch_stats")

    y = ckbn.checkpoint(block, x)
    y.square().sum().backward()
    assert len(outputs) == 2, "the recompute ran"
    assert torch.equal(outputs[0], outputs[1]), "the recomputed fused output must be bitwise equal"
    assert len(stats_calls) == 1, "the recompute must not compute statistics"

    y_plain = plain_block(x.detach().requires_grad_())
    y_plain.square().sum().backward()
    assert torch.equal(y, y_plain)
    for (name, p), p_plain in zip(block.named_parameters(), plain_block.parameters()):
        assert torch.equal(p.grad, p_plain.grad), name
    for (name, b), b_plain in zip(block.named_buffers(), plain_block.buffers()):
        assert torch.equal(b, b_plain), name


# --------------------------------------------------------------------------------------------
# Registration and bad input


@pytest.mark.skipif(ckbn.backend() != "extension", reason="opcheck checks the compiled registration")
@fused
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_fused(layout, activation, param):
    x, dy, weight, bias, mean, invstd = fused_inputs((3, 4, 5, 6), layout, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.ckbn.normalize.default, (x, mean, invstd, weight, bias, activation, param))
    torch.library.opcheck(
        torch.ops.ckbn.backward.default,
        (dy, x, mean, invstd, weight, True, [True, True, True], bias, activation, param),
    )


BAD_ACTIVATIONS = {
    "unknown name": ("gelu", 0.0, "activation must be one of 'identity', 'relu', 'relu6', 'leaky_relu'"),
    "case matters": ("ReLU", 0.0, "but got 'ReLU'"),
    "nan slope": ("leaky_relu", float("nan"), "negative slope .* must be a finite number"),
    "infinite slope": ("leaky_relu", float("inf"), "negative slope .* must be a finite number"),
    "param of relu": ("relu", 0.1, "activation 'relu' takes no parameter"),
}


@pytest.mark.parametrize("case", BAD_ACTIVATIONS)
def test_bad_activation(case, device):
    activation, param, message = BAD_ACTIVATIONS[case]
    x, dy, weight, bias, mean, invstd = fused_inputs((3, 4, 5), "contiguous", torch.float32, device)
    with pytest.raises(RuntimeError, match=message):
        ops.normalize(x, mean, invstd, weight, bias, activation, param)
    with pytest.raises(RuntimeError, match=message):
        ops.backward(dy, x, mean, invstd, weight, True, [True, True, True], bias, activation, param)


def test_bad_bias_of_fused_backward(device):
    x, dy, weight, bias, mean, invstd = fused_inputs((3, 4, 5), "contiguous", torch.float32, device)
    with pytest.raises(RuntimeError, match="bias should contain 4 elements not 5"):
        ops.backward(dy, x, mean, invstd, weight, True, [True, True, True], torch.ones(5, device=device), "relu", 0.0)


def test_failing_fused_forward_changes_nothing(device):
    bn = FusedBatchNorm2d(4, "no_such_activation", 0.0).to(device)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(RuntimeError, match="activation must be one of"):
        bn(torch.randn(3, 4, 5, 5, device=device))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
