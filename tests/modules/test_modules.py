"""ckbn.BatchNorm1d/2d/3d against torch's BatchNorm: outputs, gradients, buffers, state_dict, errors."""

import copy

import pytest
import torch

import ckbn

# (ckbn class, torch class, input shape)
SHAPES = [
    (ckbn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3)),
    (ckbn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 5, 7)),
    (ckbn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 6)),
    (ckbn.BatchNorm2d, torch.nn.BatchNorm2d, (2, 1, 1, 1)),  # C=1, N*HW=2
    (ckbn.BatchNorm2d, torch.nn.BatchNorm2d, (8, 5, 1, 1)),  # H*W=1
    (ckbn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 4, 3, 2, 5)),
]
CONFIGS = {
    "default": dict(),
    "momentum_none": dict(momentum=None),
    "momentum_0.3": dict(momentum=0.3),
    "no_affine": dict(affine=False),
    "no_running_stats": dict(track_running_stats=False),
    "eps_1e-3": dict(eps=1e-3),
}


def _pair(ckbn_cls, torch_cls, channels, device, dtype=torch.float64, **kwargs):
    ours = ckbn_cls(channels, device=device, dtype=dtype, **kwargs)
    theirs = torch_cls(channels, device=device, dtype=dtype, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _step(module, x, grad_out):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad_out)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return y.detach(), grads


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("ckbn_cls,torch_cls,shape", SHAPES, ids=[str(s[2]) for s in SHAPES])
def test_matches_torch_over_steps(device, ckbn_cls, torch_cls, shape, config):
    torch.manual_seed(0)
    ours, theirs = _pair(ckbn_cls, torch_cls, shape[1], device, **CONFIGS[config])
    for step in range(4):
        if step == 3:  # the last step in eval mode: running statistics in use
            ours.eval()
            theirs.eval()
        x = (torch.randn(shape, device=device, dtype=torch.float64) * 3 + step).contiguous()
        grad_out = torch.randn(shape, device=device, dtype=torch.float64)
        y_ours, grads_ours = _step(ours, x, grad_out)
        y_theirs, grads_theirs = _step(theirs, x, grad_out)
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
        for g_ours, g_theirs in zip(grads_ours, grads_theirs):
            torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-9)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_low_precision_against_float64(device, dtype, memory_format):
    """fp32/fp16/bf16 modules against torch's float64 BatchNorm on the same data."""
    torch.manual_seed(0)
    shape = (8, 6, 7, 5)
    ours = ckbn.BatchNorm2d(6, device=device).to(dtype)
    oracle = torch.nn.BatchNorm2d(6, device=device, dtype=torch.float64)
    x = (torch.randn(shape, device=device) * 2 + 1).to(dtype).contiguous(memory_format=memory_format)
    y = ours(x)
    expected = oracle(x.double())
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=memory_format)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.running_mean.double(), oracle.running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.running_var.double(), oracle.running_var, rtol=tol, atol=tol)
    assert ours.num_batches_tracked.item() == 1


def test_fp32_parameters_with_half_input(device):
    """AMP layout: half activations, fp32 parameters and running statistics."""
    torch.manual_seed(0)
    ours = ckbn.BatchNorm2d(4, device=device)
    oracle = torch.nn.BatchNorm2d(4, device=device, dtype=torch.float64)
    x = torch.randn(6, 4, 5, 5, device=device).to(torch.bfloat16).requires_grad_()
    y = ours(x)
    assert y.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), oracle(x.detach().double()), rtol=5e-2, atol=5e-2)


def test_state_dict_round_trip_with_torch():
    torch.manual_seed(0)
    ours = ckbn.BatchNorm2d(5, momentum=None)
    theirs = torch.nn.BatchNorm2d(5, momentum=None)
    ours(torch.randn(4, 5, 3, 3))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value)
    theirs(torch.randn(4, 5, 3, 3))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    assert isinstance(ours, torch.nn.BatchNorm2d)
    assert repr(ours) == repr(theirs)


def _buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before):
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


# case: (module class, a valid input shape, the bad input, exception type, message)
BAD_INPUTS = {
    "3d_to_2d": (
        ckbn.BatchNorm2d,
        (4, 3, 5, 5),
        lambda: torch.randn(4, 3, 5),
        ValueError,
        "expected 4D input \\(got 3D input\\)",
    ),
    "4d_to_3d": (
        ckbn.BatchNorm3d,
        (4, 3, 2, 2, 2),
        lambda: torch.randn(4, 3, 5, 5),
        ValueError,
        "expected 5D input \\(got 4D input\\)",
    ),
    "1d_input": (
        ckbn.BatchNorm1d,
        (4, 3),
        lambda: torch.randn(3),
        ValueError,
        "expected 2D or 3D input \\(got 1D input\\)",
    ),
    "channels": (
        ckbn.BatchNorm2d,
        (4, 3, 5, 5),
        lambda: torch.randn(4, 4, 5, 5),
        RuntimeError,
        "should contain 4 elements not 3",
    ),
    "integer": (
        ckbn.BatchNorm2d,
        (4, 3, 5, 5),
        lambda: torch.ones(4, 3, 5, 5, dtype=torch.int64),
        RuntimeError,
        "floating-point",
    ),
    "one_value": (
        ckbn.BatchNorm2d,
        (4, 3, 5, 5),
        lambda: torch.randn(1, 3, 1, 1),
        ValueError,
        "Expected more than 1 value per channel",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_raises_and_changes_nothing(case):
    cls, valid_shape, make_bad_input, error, message = BAD_INPUTS[case]
    bn = cls(3)
    bn(torch.randn(valid_shape))  # non-trivial buffers to compare against
    before = _buffers(bn)
    with pytest.raises(error, match=message):
        bn(make_bad_input())
    _assert_unchanged(bn, before)


def test_torch_bumps_counter_on_bad_input_but_ckbn_does_not():
    """The reason for validating first: torch's BN counts a batch before it rejects it."""
    theirs, ours = torch.nn.BatchNorm2d(3), ckbn.BatchNorm2d(3)
    bad = torch.randn(1, 3, 1, 1)
    for module in (theirs, ours):
        with pytest.raises(ValueError):
            module(bad)
    assert theirs.num_batches_tracked.item() == 1
    assert ours.num_batches_tracked.item() == 0


def test_failure_inside_the_op_changes_nothing():
    bn = ckbn.BatchNorm2d(3).double()  # float64 parameters: float32 input is rejected by normalize
    before = _buffers(bn)
    with pytest.raises(RuntimeError):
        bn(torch.randn(4, 3, 2, 2, dtype=torch.float32))
    _assert_unchanged(bn, before)


def test_empty_batch(device):
    bn = ckbn.BatchNorm2d(3, device=device)
    before = _buffers(bn)
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    y = bn(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    _assert_unchanged(bn, before)
    assert not any(torch.isnan(v.float()).any() for v in bn.state_dict().values())


def test_training_forward_under_no_grad_updates_running_stats():
    """BN recalibration: a training-mode forward without autograd still counts."""
    torch.manual_seed(0)
    ours, theirs = _pair(ckbn.BatchNorm2d, torch.nn.BatchNorm2d, 3, "cpu")
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
        theirs(x)
    assert ours.num_batches_tracked.item() == 1
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_convert_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(4 * 6 * 6, affine=False)),
    )
    model[1].weight.requires_grad_(False)
    model[1].eval()
    reference = copy.deepcopy(model)
    weight = model[1].weight
    converted = ckbn.convert_model(model)
    assert converted is model
    assert type(model[1]) is ckbn.BatchNorm2d and type(model[2][1]) is ckbn.BatchNorm1d
    assert model[1].weight is weight and not model[1].weight.requires_grad
    assert not model[1].training and model[2][1].training
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x))
    bn = torch.nn.BatchNorm3d(2, momentum=None, eps=1e-3)
    single = ckbn.convert_model(bn)
    assert type(single) is ckbn.BatchNorm3d and single.momentum is None and single.eps == 1e-3
    assert single.running_var is bn.running_var
