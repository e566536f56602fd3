"""The operators' argument contract, on every implementation (the compiled kernels, their fake
kernels, the reference): which eps they refuse, what layout an empty channels_last batch keeps, and
that an argument on another device is refused as the kernels refuse it, never answered with an
uninitialised tensor."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ckbn import ops

needs_fakes = pytest.mark.skipif(
    not ops.extension_loaded, reason="fake kernels are registered for the compiled operators only"
)


# --- eps ------------------------------------------------------------------------------------------


def _eps_op_calls():
    x = torch.randn(4, 3, 5)
    buffers = [torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long)]
    stats = [torch.randn(3), torch.rand(3) + 0.5]
    return {
        "batch_stats": (lambda eps: (x, eps), []),
        "update_running_stats": (lambda eps: (*buffers, *stats, 0.1, eps, 20), buffers),
    }


@pytest.mark.parametrize("implementation", ["backend", pytest.param("fake", marks=needs_fakes)])
@pytest.mark.parametrize("eps", [-1.0, -1e-12, float("nan")], ids=str)
@pytest.mark.parametrize("op", ["batch_stats", "update_running_stats"])
def test_op_rejects_eps_it_cannot_use(op, eps, implementation):
    """A negative eps would give NaN statistics: a RuntimeError, and no buffer written."""
    make_args, buffers = _eps_op_calls()[op]
    before = [b.clone() for b in buffers]
    if implementation == "fake":
        with FakeTensorMode() as mode, pytest.raises(RuntimeError, match="expected eps to be non-negative"):
            args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in make_args(eps)]
            getattr(torch.ops.ckbn, op)(*args)
    else:
        with pytest.raises(RuntimeError, match="expected eps to be non-negative"):
            getattr(ops, op)(*make_args(eps))
    for buffer, value in zip(buffers, before):
        assert torch.equal(buffer, value)


def test_op_accepts_eps_zero():
    """SyncBatchNorm gathers variances with eps=0; a zero-variance channel then has infinite invstd."""
    mean, invstd = ops.batch_stats(torch.ones(4, 2, 3), 0.0)
    assert torch.equal(mean, torch.ones(2)) and torch.isinf(invstd).all()


# --- empty channels_last batch --------------------------------------------------------------------


def _empty_op_calls():
    x = torch.randn(0, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    mean, invstd, weight = torch.zeros(3), torch.ones(3), torch.rand(3)
    return {
        "normalize": lambda: ops.normalize(x, mean, invstd, weight, None),
        "backward": lambda: ops.backward(torch.randn_like(x), x, mean, invstd, weight, True, [True, False, False])[0],
        "backward_elemt": lambda: ops.backward_elemt(torch.randn_like(x), x, mean, invstd, weight, mean, mean),
    }


@pytest.mark.parametrize("op", ["normalize", "backward", "backward_elemt"])
def test_ops_keep_empty_channels_last(op):
    out = _empty_op_calls()[op]()
    assert out.shape == (0, 3, 4, 5)
    assert out.stride() == torch.empty(0, 3, 4, 5, memory_format=torch.channels_last).stride()


@needs_fakes
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 4, 5), (0, 3, 2, 4, 5)], ids=["empty_2d", "2d", "empty_3d"])
def test_fake_normalize_gives_the_kernels_strides(shape):
    memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    args = (x, torch.zeros(3), torch.ones(3), None, None)
    real = torch.ops.ckbn.normalize(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.ckbn.normalize(*[mode.from_tensor(a) if a is not None else a for a in args])
    assert fake.stride() == real.stride()


# --- arguments on another device ------------------------------------------------------------------


def _tensors():
    x = torch.randn(4, 3, 5, 5)
    return dict(
        input=x,
        grad_output=torch.randn_like(x),
        mean=torch.randn(3),
        invstd=torch.rand(3) + 0.5,
        weight=torch.rand(3) + 0.5,
        bias=torch.randn(3),
        mean_dy=torch.randn(3),
        mean_dy_xmu=torch.randn(3),
        running_mean=torch.zeros(3),
        running_var=torch.ones(3),
        num_batches_tracked=torch.zeros((), dtype=torch.long),
    )


# Each op's arguments in schema order: a string names a tensor of _tensors(), anything else is itself.
SIGNATURES = {
    "normalize": ["input", "mean", "invstd", "weight", "bias"],
    "update_running_stats": ["running_mean", "running_var", "num_batches_tracked", "mean", "invstd", 0.1, 1e-5, 100],
    "backward": ["grad_output", "input", "mean", "invstd", "weight", True, [True, True, True]],
    "backward_reduce": ["grad_output", "input", "mean"],
    "backward_elemt": ["grad_output", "input", "mean", "invstd", "weight", "mean_dy", "mean_dy_xmu"],
}
# update_running_stats has no input: its tensors must sit with mean.
ANCHOR = {"update_running_stats": "mean"}
DEVICE_CASES = [
    pytest.param(op, name, id=f"{op}-{name}")
    for op, signature in SIGNATURES.items()
    for name in signature
    if isinstance(name, str) and name != ANCHOR.get(op, "input")
]


def _arguments(op, tensors):
    return [tensors[a] if isinstance(a, str) else a for a in SIGNATURES[op]]


@pytest.mark.parametrize("op,name", DEVICE_CASES)
def test_op_rejects_an_argument_on_the_meta_device(op, name):
    """A meta argument beside CPU input reaches the fake kernel in the compiled backend: it must
    refuse as the kernels do, not return an uninitialised tensor."""
    tensors = _tensors()
    before = {key: value.clone() for key, value in tensors.items()}
    tensors[name] = torch.empty_like(tensors[name], device="meta")
    anchor = ANCHOR.get(op, "input")
    message = f"expected {name} to be on the same device as {anchor} \\(cpu\\), but got meta"
    with pytest.raises(RuntimeError, match=message):
        getattr(ops, op)(*_arguments(op, tensors))
    for key, value in before.items():
        if key != name:
            assert torch.equal(tensors[key], value), key


@needs_fakes
@pytest.mark.parametrize("op,name", DEVICE_CASES)
def test_fake_kernel_rejects_an_argument_on_another_device(op, name):
    """Under torch.compile the fake kernel is what sees the devices: a CUDA argument beside CPU input."""
    with FakeTensorMode() as mode:
        tensors = {key: mode.from_tensor(value) for key, value in _tensors().items()}
        tensors[name] = torch.empty_like(tensors[name], device="cuda")
        anchor = ANCHOR.get(op, "input")
        with pytest.raises(RuntimeError, match=f"expected {name} to be on the same device as {anchor}"):
            getattr(torch.ops.ckbn, op)(*_arguments(op, tensors))
