"""ckbn under autocast and with channels_last input behaves as torch's BatchNorm does."""

import copy

import pytest
import torch
from conftest import DEVICES

import ckbn

CUDA_MARKS = [mark for param in DEVICES if param != "cpu" for mark in param.marks]
AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, marks=CUDA_MARKS, id="cuda-fp16"),
    pytest.param("cuda", torch.bfloat16, marks=CUDA_MARKS, id="cuda-bf16"),
]
MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def conv_bn_relu(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
    ).to(device)
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def autocast_step(model, x, device, dtype):
    """A training step and an eval forward under autocast; the loss is taken in fp32, outside."""
    model.train()
    with torch.autocast(device, dtype=dtype):
        y = model(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (y.float() * weights).sum().backward()
    model.eval()
    with torch.autocast(device, dtype=dtype):
        y_eval = model(x)
    return y.detach(), y_eval.detach()


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_matches_torch(device, dtype, channels_last):
    theirs = conv_bn_relu(device)
    ours = ckbn.convert_model(copy.deepcopy(theirs))
    x = torch.randn(4, 3, 8, 8, device=device) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        ours.to(memory_format=torch.channels_last)
        theirs.to(memory_format=torch.channels_last)
    y_ours, y_eval_ours = autocast_step(ours, x, device, dtype)
    y_theirs, y_eval_theirs = autocast_step(theirs, x, device, dtype)

    # Half input in, half output out, as torch's BN gives under autocast.
    assert y_ours.dtype == y_theirs.dtype == dtype
    assert y_eval_ours.dtype == y_eval_theirs.dtype == dtype
    if channels_last:
        assert y_ours.is_contiguous(memory_format=torch.channels_last)
    # Outputs within the half type's rounding of torch's.
    torch.testing.assert_close(y_ours, y_theirs, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_eval_ours, y_eval_theirs, rtol=2e-2, atol=2e-2)

    # Parameters, gradients and running statistics stay fp32.
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
        assert p_ours.dtype == p_ours.grad.dtype == torch.float32, name
        error = relative_error(p_ours.grad, p_theirs.grad)
        assert error < 2e-2, f"grad of {name}: relative error {error:.1e}"
    for (name, b_ours), b_theirs in zip(ours.named_buffers(), theirs.buffers()):
        assert b_ours.dtype == b_theirs.dtype, name
        if b_ours.is_floating_point():
            assert b_ours.dtype == torch.float32, name
            # Both take fp32 statistics of the same half-precision conv output.
            torch.testing.assert_close(b_ours, b_theirs, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:
            assert b_ours.item() == b_theirs.item() == 1, name


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_statistics_are_fp32_math(device, dtype):
    """The running mean and variance are those of the half input computed in high precision."""
    bn = ckbn.BatchNorm2d(5, momentum=1.0).to(device)
    x = (torch.randn(4, 5, 6, 6, device=device) * 3 + 100).to(dtype)  # far from zero: cancellation shows
    with torch.autocast(device, dtype=dtype):
        y = bn(x)
    assert y.dtype == dtype
    exact = x.double()
    torch.testing.assert_close(bn.running_mean, exact.mean(dim=(0, 2, 3)).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.running_var, exact.var(dim=(0, 2, 3)).float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "ckbn_cls,torch_cls,shape",
    [
        (ckbn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 6, 5, 3)),
        (ckbn.BatchNorm2d, torch.nn.BatchNorm2d, (3, 6, 1, 1)),  # channels_last and contiguous at once
        (ckbn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 6, 3, 4, 2)),
    ],
    ids=["2d", "2d-1x1", "3d"],
)
def test_channels_last_output_and_gradient(device, ckbn_cls, torch_cls, shape, training):
    torch.manual_seed(0)
    memory_format = MEMORY_FORMATS[len(shape)]
    x = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    grad_output = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    results = []
    for cls in (ckbn_cls, torch_cls):
        torch.manual_seed(1)
        module = cls(shape[1], device=device).train(training)
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.running_var.uniform_(0.5, 1.5)
        x_ = x.detach().clone().requires_grad_()
        y = module(x_)
        y.backward(grad_output)
        results.append(dict(output=y, grad_input=x_.grad, grad_weight=module.weight.grad, grad_bias=module.bias.grad))
    ours, theirs = results
    assert ours["output"].is_contiguous(memory_format=memory_format)
    assert ours["grad_input"].is_contiguous(memory_format=memory_format)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
