"""The modules' arguments checked as torch checks them, torch's class beside ckbn's on the same
input: eps, a parameter or buffer on another device, an empty channels_last batch, a cumulative
average without a counter. Where ckbn differs on purpose (it counts no empty batch; it rejects
before it touches state; it refuses a NaN eps) the test says so and checks ckbn's rule.
"""

import pytest
import torch
from helpers import raised

import ckbn

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


def test_nan_eps_in_training_is_refused_by_the_op():
    """torch's checks let a NaN eps through and it returns NaN; ckbn's batch_stats refuses it."""
    ours, theirs = ckbn.BatchNorm2d(3, eps=float("nan")), torch.nn.BatchNorm2d(3, eps=float("nan"))
    x = torch.randn(4, 3, 2, 2)
    assert torch.isnan(theirs(x)).all()
    before = _state(ours)
    with pytest.raises(RuntimeError, match="ckbn::batch_stats: expected eps to be non-negative, but got nan"):
        ours(x)
    _assert_state(ours, before)


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


# --- arguments on another device ------------------------------------------------------------------


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


# --- no counter -----------------------------------------------------------------------------------


def test_cumulative_average_without_a_counter_matches_torch():
    """momentum=None with num_batches_tracked removed: torch averages with factor 0."""
    ours, theirs = ckbn.BatchNorm2d(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
    for module in (ours, theirs):
        module.num_batches_tracked = None
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
