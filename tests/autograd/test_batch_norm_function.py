"""The autograd Function: gradients by gradcheck, and exactly what it saves for backward."""

import pytest
import torch

import ckbn
from ckbn import ops
from ckbn.autograd import BatchNormFunction
from ckbn.policy import batch_norm_forward

EPS = 1e-5


def _train_forward(x, weight, bias):
    mean, invstd = ops.batch_stats(x.detach(), EPS)
    return BatchNormFunction.apply(x, weight, bias, mean, invstd, True, EPS, "identity", 0.0)


def _eval_forward(running_mean, running_var):
    def forward(x, weight, bias):
        return BatchNormFunction.apply(
            x, weight, bias, running_mean, torch.rsqrt(running_var + EPS), False, EPS, "identity", 0.0
        )

    return forward


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 2, 2, 3), (5, 1), (2, 2, 2, 1, 2)], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck(device, shape, affine, train):
    gen = torch.Generator().manual_seed(0)
    options = dict(dtype=torch.float64)
    x = torch.randn(shape, generator=gen, **options).to(device).requires_grad_()
    channels = shape[1]
    weight = bias = None
    if affine:
        weight = (torch.rand(channels, generator=gen, **options) + 0.5).to(device).requires_grad_()
        bias = torch.randn(channels, generator=gen, **options).to(device).requires_grad_()
    if train:
        forward = _train_forward
    else:
        running_mean = torch.randn(channels, generator=gen, **options).to(device)
        running_var = (torch.rand(channels, generator=gen, **options) + 0.5).to(device)
        forward = _eval_forward(running_mean, running_var)
    assert torch.autograd.gradcheck(forward, (x, weight, bias), eps=1e-6, atol=1e-6)


def _with_saved_tensors(forward):
    """forward()'s result and every tensor autograd saved for its backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return forward(), saved


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_saves_only_input_weight_mean_invstd(device, memory_format):
    """Memory contract: the input, the weight and two (C,) vectors, nothing else full-size."""
    bn = ckbn.BatchNorm2d(16).to(device)
    x = torch.randn(8, 16, 10, 10, device=device).contiguous(memory_format=memory_format).requires_grad_()
    y, saved = _with_saved_tensors(lambda: bn(x))
    assert len(saved) == 4
    assert saved[0] is x
    assert saved[1] is bn.weight
    assert [tuple(t.shape) for t in saved[2:]] == [(16,), (16,)]
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes == x.numel() * x.element_size() + 3 * 16 * 4
    y.sum().backward()  # the saved set is sufficient for backward
    assert x.grad is not None and bn.weight.grad is not None


@pytest.mark.parametrize("activation,param", [("relu", 0.0), ("leaky_relu", 0.2), ("silu", 0.0), ("hardswish", 0.0)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fused_saves_only_input_weight_bias_mean_invstd(device, memory_format, activation, param):
    """A fused activation adds the bias, (C,), to the saved set: no pre-activation, no output."""
    bn = ckbn.BatchNorm2d(16).to(device)
    x = torch.randn(8, 16, 10, 10, device=device).contiguous(memory_format=memory_format).requires_grad_()
    y, saved = _with_saved_tensors(lambda: batch_norm_forward(bn, x, activation=activation, activation_param=param))
    assert len(saved) == 5
    assert saved[0] is x and saved[1] is bn.weight and saved[2] is bn.bias
    assert [tuple(t.shape) for t in saved[3:]] == [(16,), (16,)]  # mean, invstd
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes == x.numel() * x.element_size() + 4 * 16 * 4
    y.sum().backward()  # the saved set is sufficient for backward
    assert x.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None


def test_backward_never_touches_running_buffers():
    bn = ckbn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = bn(x)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    y.square().sum().backward()
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "function", [BatchNormFunction, ckbn.distributed.SyncBatchNormFunction], ids=lambda f: f.__name__
)
def test_cached_forward_signature_is_the_functions_own(function):
    """apply binds every call's arguments to forward's signature; the cached one (made once, for
    speed) must name forward's parameters, in order, as inspect would build them."""
    import inspect

    forward = function.forward
    assert "__signature__" in vars(forward)
    code = forward.__code__
    assert list(forward.__signature__.parameters) == list(code.co_varnames[: code.co_argcount])
    cached = forward.__signature__
    del forward.__signature__
    try:
        assert inspect.signature(forward) == cached
    finally:
        forward.__signature__ = cached
