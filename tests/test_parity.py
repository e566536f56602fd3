"""Drop-in parity with torch's BatchNorm where ckbn once differed: eps checks, empty channels_last
batches, lazy modules, and arguments on another device, for the modules and the operators (compiled
kernels, their fake kernels, and the reference).

Each module test runs torch's class beside ckbn's on the same input. Where ckbn differs on purpose
(it counts no empty batch; it rejects before it touches state) the test says so and checks ckbn's
rule.
"""

import inspect

import pytest
import torch
from helpers import raised
from torch._subclasses.fake_tensor import FakeTensorMode

import ckbn
from ckbn import _backend

ops = _backend.ops
needs_fakes = pytest.mark.skipif(
    not _backend.extension_loaded, reason="fake kernels are registered for the compiled operators only"
)

# kind: (ckbn class, torch class with the same semantics in one process, input shape)
MODULES = {
    "1d": (ckbn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)),
    "2d": (ckbn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 2, 3)),
    "3d": (ckbn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 2, 2)),
    # Without a process group ckbn's SyncBatchNorm is BatchNorm (torch's refuses CPU input).
    "sync": (ckbn.SyncBatchNorm, torch.nn.BatchNorm2d, (4, 3, 2, 3)),
}


def _state(module):
    return {key: value.clone() for key, value in module.state_dict().items()}


def _assert_state(module, expected):
    for key, value in module.state_dict().items():
        assert torch.equal(value, expected[key]), key


# --- eps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("track_running_stats", [True, False], ids=["tracking", "not_tracking"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("eps", [-1.0, 0.0, -1e-3, 0, 1e-5], ids=["-1.0", "0.0", "-1e-3", "int_0", "1e-5"])
@pytest.mark.parametrize("kind", MODULES)
def test_eps_checked_as_torch_before_any_state_change(kind, eps, training, track_running_stats):
    ckbn_cls, torch_cls, shape = MODULES[kind]
    ours = ckbn_cls(3, eps=eps, track_running_stats=track_running_stats).train(training)
    theirs = torch_cls(3, eps=eps, track_running_stats=track_running_stats).train(training)
    x = torch.randn(shape)
    before = _state(ours)
    torch_error, ckbn_error = raised(lambda: theirs(x)), raised(lambda: ours(x))
    if torch_error is None:
        assert ckbn_error is None
        torch.testing.assert_close(ours(x), theirs(x))
        return
    assert type(ckbn_error) is type(torch_error) is ValueError
    assert str(ckbn_error) == str(torch_error)
    assert str(ckbn_error).startswith("batch_norm eps must be")
    _assert_state(ours, before)


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

EMPTY = {
    "2d": (ckbn.BatchNorm2d, torch.nn.BatchNorm2d, (0, 3, 4, 5), torch.channels_last),
    "3d": (ckbn.BatchNorm3d, torch.nn.BatchNorm3d, (0, 3, 2, 4, 5), torch.channels_last_3d),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", EMPTY)
def test_empty_channels_last_batch_keeps_its_format(kind, training):
    ckbn_cls, torch_cls, shape, memory_format = EMPTY[kind]
    ours, theirs = ckbn_cls(3).train(training), torch_cls(3).train(training)
    before = _state(ours)
    results = []
    for module in (ours, theirs):
        x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_()
        y = module(x)
        (grad_input,) = torch.autograd.grad(y, x, torch.randn_like(y))
        results.append((y, grad_input))
    for ours_tensor, theirs_tensor in zip(*results):
        assert ours_tensor.stride() == theirs_tensor.stride()
        assert not ours_tensor.is_contiguous() or ours_tensor.is_contiguous(memory_format=memory_format)
        assert ours_tensor.stride()[1] == 1  # channels innermost
    # ckbn's rule, not torch's: an empty batch changes nothing; torch counts it.
    _assert_state(ours, before)
    assert theirs.num_batches_tracked.item() == int(training)


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


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_module_with_a_tensor_on_another_device_raises_as_torch(name, training):
    ours, theirs = ckbn.BatchNorm2d(3).train(training), torch.nn.BatchNorm2d(3).train(training)
    for module in (ours, theirs):
        tensor = getattr(module, name)
        moved = tensor.to("meta")
        if isinstance(tensor, torch.nn.Parameter):
            setattr(module, name, torch.nn.Parameter(moved))
        else:
            setattr(module, name, moved)
    x = torch.randn(4, 3, 2, 2)
    torch_error, ckbn_error = raised(lambda: theirs(x)), raised(lambda: ours(x))
    assert type(ckbn_error) is type(torch_error) is RuntimeError
    assert str(ckbn_error) == str(torch_error)
    assert ours.num_batches_tracked.item() == 0


# --- lazy modules ---------------------------------------------------------------------------------

LAZY = {
    "1d": (ckbn.LazyBatchNorm1d, torch.nn.LazyBatchNorm1d, ckbn.BatchNorm1d, (4, 3, 5)),
    "2d": (ckbn.LazyBatchNorm2d, torch.nn.LazyBatchNorm2d, ckbn.BatchNorm2d, (4, 3, 2, 3)),
    "3d": (ckbn.LazyBatchNorm3d, torch.nn.LazyBatchNorm3d, ckbn.BatchNorm3d, (2, 3, 2, 2, 2)),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", LAZY)
def test_lazy_module_becomes_ckbn_class_and_matches_torch(kind, training):
    lazy_cls, torch_lazy_cls, ckbn_cls, shape = LAZY[kind]
    ours = lazy_cls(momentum=None, dtype=torch.float64).train(training)
    theirs = torch_lazy_cls(momentum=None, dtype=torch.float64).train(training)
    assert isinstance(ours, torch_lazy_cls) and ours.has_uninitialized_params()
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        grad_output = torch.randn(shape, dtype=torch.float64)
        y_ours = ours(x)
        grads_ours = torch.autograd.grad(y_ours, [x, ours.weight, ours.bias], grad_output)
        y_theirs = theirs(x)
        grads_theirs = torch.autograd.grad(y_theirs, [x, theirs.weight, theirs.bias], grad_output)
        assert type(ours) is ckbn_cls and ours.num_features == shape[1]
        torch.testing.assert_close(y_ours, y_theirs)
        torch.testing.assert_close(grads_ours, grads_theirs)
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


def test_lazy_first_forward_under_checkpoint_counts_once():
    for checkpoint in (ckbn.checkpoint, lambda f, x: torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)):
        lazy = ckbn.LazyBatchNorm2d()
        x = torch.randn(4, 3, 2, 3, requires_grad=True)
        checkpoint(lazy, x).sum().backward()
        assert type(lazy) is ckbn.BatchNorm2d and lazy.num_batches_tracked.item() == 1
        oracle = torch.nn.BatchNorm2d(3)
        oracle(x)
        torch.testing.assert_close(lazy.running_var, oracle.running_var)


def test_lazy_module_rejects_bad_eps_without_counting():
    lazy = ckbn.LazyBatchNorm2d(eps=0.0)
    with pytest.raises(ValueError, match="batch_norm eps must be positive"):
        lazy(torch.randn(4, 3, 2, 2))
    assert lazy.num_batches_tracked.item() == 0


@pytest.mark.parametrize("materialised", [False, True], ids=["unmaterialised", "materialised"])
def test_convert_model_converts_torch_lazy_modules(materialised):
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.LazyBatchNorm2d(momentum=0.3))

    model, reference = build(), build()
    x = torch.randn(4, 2, 3, 3)
    if materialised:
        for m in (model, reference):
            m(x)  # torch's lazy module is now a torch.nn.BatchNorm2d
    weight = model[1].weight
    converted = ckbn.convert_model(model)
    assert converted is model and model[1].weight is weight  # shared, uninitialised or not
    assert type(model[1]) is (ckbn.BatchNorm2d if materialised else ckbn.LazyBatchNorm2d)
    torch.testing.assert_close(model(x), reference(x))
    assert type(model[1]) is ckbn.BatchNorm2d and model[1].weight is weight
    torch.testing.assert_close(model.state_dict(), reference.state_dict())


@pytest.mark.skipif(
    "bias" not in inspect.signature(torch.nn.BatchNorm2d).parameters, reason="this torch has no bias=False"
)
def test_convert_model_keeps_a_missing_bias():
    bn = torch.nn.BatchNorm2d(3, bias=False)
    converted = ckbn.convert_model(bn)
    assert converted.bias is None and list(converted.state_dict()) == list(bn.state_dict())
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(converted(x), torch.nn.BatchNorm2d(3, bias=False)(x))


# --- differences the README lists under Limits ----------------------------------------------------


def test_nan_eps_in_training_is_refused_by_the_op():
    """torch's checks let a NaN eps through and it returns NaN; ckbn's batch_stats refuses it."""
    ours, theirs = ckbn.BatchNorm2d(3, eps=float("nan")), torch.nn.BatchNorm2d(3, eps=float("nan"))
    x = torch.randn(4, 3, 2, 2)
    assert torch.isnan(theirs(x)).all()
    before = _state(ours)
    with pytest.raises(RuntimeError, match="ckbn::batch_stats: expected eps to be non-negative, but got nan"):
        ours(x)
    _assert_state(ours, before)


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


def test_cumulative_average_without_a_counter_matches_torch():
    """momentum=None with num_batches_tracked removed: torch averages with factor 0."""
    ours, theirs = ckbn.BatchNorm2d(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
    for module in (ours, theirs):
        module.num_batches_tracked = None
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
