"""Forward-mode AD and double backward of ckbn's BatchNorm, against torch's BatchNorm in float64 and
against finite differences (gradcheck, gradgradcheck).

Every test runs the module forward with weight and bias passed in (torch.func.functional_call), so
that they are inputs of the checked function too, and a fused activation applied the way the kernels
apply it; the oracle applies torch's activation to torch's BatchNorm.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from bn_pair import ACTIVATIONS_UNDER_TEST, MODES, assert_same_buffers, make_pair
from torch.func import functional_call

import ckbn
from ckbn import ops

# 1d with and without length, 2d, 3d; C=1, H*W=1 and N*H*W=2 among them.
SHAPES = [(4, 3), (3, 2, 5), (5, 1, 3), (3, 2, 2, 3), (2, 3, 1, 1), (2, 2, 2, 1, 2)]
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


def _channels_last(x):
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return x.contiguous(memory_format=formats[x.dim()]) if x.dim() in formats else x


# The input's layout, values unchanged: contiguous, channels_last (4-D and 5-D), or batch-strided.
LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": _channels_last,
    "strided": lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
}


def make_inputs(model, shape, affine, device, dtype=torch.float64):
    """(x, weight, bias) or (x,): fresh leaves that require grad."""
    gen = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1).to(device).requires_grad_()
    if not affine:
        return (x,)
    return (x, model.bn.weight.detach().clone().requires_grad_(), model.bn.bias.detach().clone().requires_grad_())


def as_function(model):
    """``model`` as a function of (x, weight, bias) or (x,)."""

    def run(x, *affine):
        return functional_call(model, dict(zip(("bn.weight", "bn.bias"), affine)), (x,))

    return run


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradgradcheck(device, shape, affine, train, activation):
    """Second derivatives by finite differences of the first, also batched (vmap) and forward-over-reverse."""
    _, model = make_pair(shape, affine, train, activation, device)
    inputs = make_inputs(model, shape, affine, device)
    assert torch.autograd.gradgradcheck(as_function(model), inputs, check_batched_grad=True, check_fwd_over_rev=True)


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 3), (2, 2, 2, 1, 2)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_penalty_matches_torch(device, dtype, shape, layout, affine, train, activation):
    """Double backward through a gradient penalty: torch's gradients, torch's running statistics."""
    results = []
    for model in make_pair(shape, affine, train, activation, device, dtype):
        inputs = make_inputs(model, shape, affine, device, dtype)
        y = as_function(model)(LAYOUTS[layout](inputs[0]), *inputs[1:])
        weights = torch.linspace(-1, 2, y.numel(), dtype=y.dtype, device=device).view_as(y)
        first = torch.autograd.grad((y * weights).sum(), inputs, create_graph=True)
        penalty = sum((g * g).sum() for g in first) + (y * y).sum()
        results.append((first, torch.autograd.grad(penalty, inputs), model))
    (first_t, second_t, theirs), (first_c, second_c, ours) = results
    torch.testing.assert_close(first_c, first_t)
    torch.testing.assert_close(second_c, second_t)
    assert_same_buffers(ours, theirs)


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize("train", MODES)
def test_first_order_backward_is_the_fused_op(monkeypatch, train, activation):
    """A plain backward runs the fused backward op; only create_graph=True takes the composite route."""
    calls = []
    fused_backward = ops.backward
    monkeypatch.setattr(ops, "backward", lambda *args: calls.append(1) or fused_backward(*args))
    shape = (4, 3, 5)
    _, model = make_pair(shape, True, train, activation, "cpu")
    inputs = make_inputs(model, shape, True, "cpu")
    y = as_function(model)(*inputs)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)
    fused = torch.autograd.grad(y, inputs, weights, retain_graph=True)
    assert len(calls) == 1
    composite = torch.autograd.grad(y, inputs, weights, create_graph=True)
    assert len(calls) == 1
    assert composite[0].grad_fn is not None  # differentiable: it depends on the input or the weight
    torch.testing.assert_close(composite, fused)


FORWARD_AD_CASES = {
    "input": (True, False, False),
    "weight": (False, True, False),
    "bias": (False, False, True),
    "all": (True, True, True),
}


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize("dual", FORWARD_AD_CASES)
@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_ad_matches_torch(device, dtype, shape, layout, train, dual, activation):
    """Tangents for a dual input, weight and bias: torch's, with torch's running statistics after."""
    results = []
    for model in make_pair(shape, True, train, activation, device, dtype):
        inputs = make_inputs(model, shape, True, device, dtype)
        gen = torch.Generator().manual_seed(7)
        tangents = [torch.randn(t.shape, generator=gen, dtype=dtype).to(device) for t in inputs]
        with fwAD.dual_level():
            args = [
                fwAD.make_dual(t.detach(), tangent) if is_dual else t.detach()
                for t, tangent, is_dual in zip(inputs, tangents, FORWARD_AD_CASES[dual])
            ]
            args[0] = LAYOUTS[layout](args[0])
            primal, tangent = fwAD.unpack_dual(as_function(model)(*args))
        results.append((primal, tangent, model))
    (primal_t, tangent_t, theirs), (primal_c, tangent_c, ours) = results
    torch.testing.assert_close(primal_c, primal_t)
    torch.testing.assert_close(tangent_c, tangent_t)
    assert_same_buffers(ours, theirs)


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_ad_gradcheck(device, shape, affine, train, activation):
    """Forward-mode Jacobian against finite differences."""
    _, model = make_pair(shape, affine, train, activation, device)
    inputs = make_inputs(model, shape, affine, device)
    assert torch.autograd.gradcheck(
        as_function(model), inputs, check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False
    )


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("dual_input", [True, False], ids=["dual_input", "plain_input"])
def test_forward_ad_running_stats_with_tangents(train, dual_input, activation):
    """Running buffers that carry tangents: torch's RuntimeError where torch raises (eval mode, with a
    dual input), otherwise torch's tangents and buffer values."""
    shape = (4, 3, 5)
    outcomes = []
    for model in make_pair(shape, True, train, activation, "cpu"):
        (x,) = make_inputs(model, shape, False, "cpu")
        bn = model.bn
        with fwAD.dual_level():
            for name in ("running_mean", "running_var"):
                setattr(bn, name, fwAD.make_dual(getattr(bn, name), torch.ones_like(getattr(bn, name))))
            x = fwAD.make_dual(x.detach(), torch.ones_like(x)) if dual_input else x.detach()
            try:
                tangent = fwAD.unpack_dual(model(x)).tangent
            except RuntimeError as error:
                outcome = ("raises", str(error))
            else:
                outcome = ("tangent", tangent)
            buffers = [fwAD.unpack_dual(b).primal.clone() for b in bn.buffers()]
        outcomes.append((outcome, buffers))
    (theirs, their_buffers), (ours, our_buffers) = outcomes
    assert theirs[0] == ("raises" if dual_input and not train else "tangent")  # the case this test covers
    assert ours[0] == theirs[0], (ours, theirs)
    if theirs[0] == "raises":
        assert ours[1] == theirs[1]
    elif theirs[1] is None:  # torch leaves the output without a tangent; ckbn's is zero
        assert ours[1] is None or not ours[1].any()
    else:
        torch.testing.assert_close(ours[1], theirs[1])
    torch.testing.assert_close(our_buffers, their_buffers)


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
def test_gradient_penalty_through_ckbn_checkpoint(activation):
    """The recompute replays the recorded statistics: the same second derivatives as without the
    checkpoint, and the running statistics updated once."""
    shape = (4, 3, 5)
    results = []
    for run in (lambda model, x: model(x), lambda model, x: ckbn.checkpoint(model, x)):
        _, model = make_pair(shape, True, True, activation, "cpu")
        inputs = make_inputs(model, shape, False, "cpu") + tuple(model.parameters())
        y = run(model, inputs[0])
        weights = torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)
        first = torch.autograd.grad((y * weights).sum(), inputs, create_graph=True)
        penalty = sum((g * g).sum() for g in first) + (y * y).sum()
        results.append((first, torch.autograd.grad(penalty, inputs), model))
    (first, second, plain), (first_c, second_c, checkpointed) = results
    torch.testing.assert_close(first_c, first)
    torch.testing.assert_close(second_c, second)
    assert_same_buffers(checkpointed, plain)
    assert checkpointed.bn.num_batches_tracked.item() == 1
