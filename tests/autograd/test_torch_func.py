"""torch.func transforms of ckbn's BatchNorm against the same transforms of torch's, in float64.

The model runs through functional_call with its parameters and buffers passed explicitly, as
torch.func expects. Where torch updates the running statistics (training mode, buffers passed as
arguments of the transformed function), ckbn's must come out equal: updated once per forward.
"""

import warnings

import pytest
import torch
from bn_pair import ACTIVATIONS_UNDER_TEST, MODES, make_pair
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import ckbn

SHAPES = [(4, 3), (3, 2, 2, 3), (2, 2, 2, 1, 2)]


def split_state(model):
    """(parameters, buffers) of ``model`` as fresh tensors, for functional_call."""
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return params, buffers


def make_input(shape, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(device)


def functional(model):
    def run(params, buffers, x):
        return functional_call(model, (params, buffers), (x,))

    return run


def scalar_loss(model):
    """A loss that is not symmetric in the outputs (a symmetric one has gradient zero through BN)."""

    def loss(params, buffers, x):
        y = functional(model)(params, buffers, x)
        weights = torch.linspace(-1, 2, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
        return (weights * y + y * y).sum()

    return loss


# Transforms whose function takes the buffers as an argument: torch updates them in training mode.
TRANSFORMS = {
    "grad": lambda model, p, b, x: grad(scalar_loss(model), argnums=(0, 2))(p, b, x),
    "jacrev": lambda model, p, b, x: jacrev(functional(model), argnums=(0, 2))(p, b, x),
    "jacfwd": lambda model, p, b, x: jacfwd(functional(model), argnums=(0, 2))(p, b, x),
}


def tangents_like(tree, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils._pytree.tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device), tree)


# Transforms that capture the buffers: torch.func forbids the buffer update itself (torch's modules
# raise in training mode), so training mode is compared on modules that track no running statistics.
CAPTURING_TRANSFORMS = {
    "jvp": lambda model, p, b, x: jvp(
        lambda p, x: functional(model)(p, b, x), (p, x), (tangents_like(p), tangents_like(x))
    ),
    "vjp": lambda model, p, b, x: vjp(lambda p, x: functional(model)(p, b, x), p, x)[1](tangents_like(x)),
}


def run_pair(transform, shape, train, activation, device, **bn_kwargs):
    """The transform's result and the buffers after it, for torch's model and ckbn's."""
    x = make_input(shape, device)
    results = []
    for model in make_pair(shape, True, train, activation, device, **bn_kwargs):
        params, buffers = split_state(model)
        results.append((transform(model, params, buffers, x), buffers))
    return results


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transform_matches_torch(device, transform, shape, train, activation):
    (theirs, their_buffers), (ours, our_buffers) = run_pair(TRANSFORMS[transform], shape, train, activation, device)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_buffers, their_buffers)
    assert our_buffers["bn.num_batches_tracked"].item() == int(train)  # one forward, one update


def loss_of_weight_bias_input(model):
    def loss(weight, bias, x, buffers):
        return scalar_loss(model)({"bn.weight": weight, "bn.bias": bias}, buffers, x)

    return loss


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_hessian_matches_torch(device, shape, train, activation):
    """torch.func.hessian (forward over reverse) of a loss in the weight, bias and input.

    The oracle is torch's BatchNorm differentiated twice by regular autograd: torch's own BatchNorm
    under torch.func.hessian gets the weight-input block wrong in training mode (finite differences
    disagree with it).
    """
    theirs, ours = make_pair(shape, True, train, activation, device)
    x = make_input(shape, device)
    params, their_buffers = split_state(theirs)
    inputs = (params["bn.weight"], params["bn.bias"], x)
    expected = torch.autograd.functional.hessian(
        lambda *inputs: loss_of_weight_bias_input(theirs)(*inputs, their_buffers), inputs
    )
    _, our_buffers = split_state(ours)
    actual = hessian(loss_of_weight_bias_input(ours), argnums=(0, 1, 2))(*inputs, our_buffers)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(our_buffers, their_buffers)
    assert our_buffers["bn.num_batches_tracked"].item() == int(train)


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize(
    "train, track_running_stats",
    [pytest.param(True, False, id="train"), pytest.param(False, True, id="eval")],
)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("transform", CAPTURING_TRANSFORMS)
def test_capturing_transform_matches_torch(device, transform, shape, train, track_running_stats, activation):
    (theirs, their_buffers), (ours, our_buffers) = run_pair(
        CAPTURING_TRANSFORMS[transform], shape, train, activation, device, track_running_stats=track_running_stats
    )
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_buffers, their_buffers)


@pytest.mark.parametrize("transform", CAPTURING_TRANSFORMS)
def test_captured_buffers_in_training_update_once_or_raise_as_torch(transform):
    """torch.func refuses in-place writes to captured tensors made by torch operations (torch's own
    modules, and the reference backend, raise); the compiled ops write them. Either way, the buffers
    end up updated exactly once or not at all."""
    shape = (4, 3, 5)
    theirs, ours = make_pair(shape, True, True, "identity", "cpu")
    x = make_input(shape, "cpu")
    theirs(x)  # one plain forward: the oracle's single update
    params, buffers = split_state(ours)
    before = {name: b.clone() for name, b in buffers.items()}
    try:
        CAPTURING_TRANSFORMS[transform](ours, params, buffers, x)
    except RuntimeError as error:
        assert "mutate a captured Tensor" in str(error)
        torch.testing.assert_close(buffers, before)
    else:
        torch.testing.assert_close(buffers, dict(theirs.named_buffers()))


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("shared_input", [False, True], ids=["batched_input", "shared_input"])
def test_vmap_with_batched_buffers(device, shared_input, shape, train, activation):
    """vmap over models (an ensemble: parameters and buffers stacked) with a batch of inputs or one
    shared input: each model's output, gradients and buffers are torch's."""
    samples = 3
    xs = torch.stack([make_input(shape, device, seed) for seed in range(samples)])
    if shared_input:
        xs = xs[0]
    results = []
    for model in make_pair(shape, True, train, activation, device):
        params, buffers = split_state(model)
        params = {name: torch.stack([p * (i + 1) for i in range(samples)]) for name, p in params.items()}
        batched = {name: torch.stack([b + i for i in range(samples)]) for name, b in buffers.items()}
        in_dims = (0, 0, None if shared_input else 0)
        output = vmap(functional(model), in_dims=in_dims)(params, batched, xs)
        grads = vmap(grad(scalar_loss(model)), in_dims=in_dims)(params, batched, xs)
        results.append((output, grads, batched))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("activation", ACTIVATIONS_UNDER_TEST)
@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vmap_with_shared_buffers(device, shape, train, activation):
    """Eval mode: torch's outputs. Training mode: a RuntimeError, as torch raises, and no buffer changed."""
    xs = torch.stack([make_input(shape, device, seed) for seed in range(3)])
    theirs, ours = make_pair(shape, True, train, activation, device)
    params, buffers = split_state(theirs)
    run = vmap(functional(theirs), in_dims=(None, None, 0))
    if train:
        with pytest.raises(RuntimeError, match="not batched|inplace arithmetic"):
            run(params, buffers, xs)  # torch's error
    else:
        expected = run(params, buffers, xs)
    params, buffers = split_state(ours)
    before = {name: b.clone() for name, b in buffers.items()}
    run = vmap(functional(ours), in_dims=(None, None, 0))
    if train:
        # The compiled ops' rule raises torch's error; the reference's in-place torch operations, vmap's.
        with pytest.raises(RuntimeError, match="not batched|inplace arithmetic"):
            run(params, buffers, xs)
        torch.testing.assert_close(buffers, before)  # a failed call changes no state
    else:
        torch.testing.assert_close(run(params, buffers, xs), expected)


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten()
        )
        self.head = torch.nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.head(self.features(x))


def replaced_pair(device):
    torch.manual_seed(0)
    theirs = SmallNet().double().to(device)
    ours = ckbn.convert_model(SmallNet().double().to(device))
    ours.load_state_dict(theirs.state_dict())
    return [torch.func.replace_all_batch_norm_modules_(model.train()) for model in (theirs, ours)]


def test_vmap_after_replace_all_batch_norm_modules(device):
    """Per-sample gradients and ensembled forwards of a training-mode model, as torch computes them,
    and no warning that a ckbn op lacks a batching rule."""
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(6, 2, 2, 5, 5, generator=gen, dtype=torch.float64).to(device)
    targets = torch.randint(0, 3, (6, 2), generator=gen).to(device)
    results = []
    for model in replaced_pair(device):
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(params, x, target):
            return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), target)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, targets)
            outputs = vmap(lambda x: functional_call(model, params, (x,)))(xs)
            jacobian = jacrev(lambda x: functional_call(model, params, (x,)))(xs[0])
        assert not [str(w.message) for w in caught if "batching rule" in str(w.message)]
        results.append((per_sample, outputs, jacobian))
    torch.testing.assert_close(results[1], results[0])
