"""Running statistics under checkpointing: exactly one update per training forward, and replay.

Every test compares against the same model run without checkpointing (the oracle), in float32 on
CPU, to 1e-5, with num_batches_tracked exactly equal.
"""

import copy
import gc

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from helpers import counting

import ckbn
from ckbn import checkpointing

STEPS = 3


def make_net(bn_cls=ckbn.BatchNorm2d):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        bn_cls(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        bn_cls(8, momentum=None),
        torch.nn.ReLU(),
    )


def batches(device="cpu"):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 6, 6, generator=gen).to(device) * 2 + 1 for _ in range(STEPS)]


def train(net, run, device="cpu"):
    """STEPS training steps of `run(net, x)`; returns the input gradients."""
    grads = []
    for x in batches(device):
        x = x.requires_grad_()
        run(net, x).square().mean().backward()
        grads.append(x.grad)
    return grads


def assert_same_state(net, oracle, grads=None, oracle_grads=None):
    for (key, value), (_, expected) in zip(net.state_dict().items(), oracle.state_dict().items()):
        if key.endswith("num_batches_tracked"):
            assert value.item() == expected.item() == STEPS, key
        else:
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, msg=key)
    for p, q in zip(net.parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    for g, h in zip(grads or [], oracle_grads or []):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)


def plain(net, x):
    return net(x)


def reentrant(net, x):
    return torch_checkpoint.checkpoint(net, x, use_reentrant=True)


def non_reentrant(net, x):
    return torch_checkpoint.checkpoint(net, x, use_reentrant=False)


def torch_sequential(net, x):
    return torch_checkpoint.checkpoint_sequential(net, 2, x, use_reentrant=False)


def torch_sequential_reentrant(net, x):
    return torch_checkpoint.checkpoint_sequential(net, 3, x, use_reentrant=True)


def ckbn_whole(net, x):
    return ckbn.checkpoint(net, x)


def ckbn_sequential(net, x):
    return ckbn.checkpoint_sequential(net, 2, x)


def ckbn_nested(net, x):
    def outer(inp):
        h = ckbn.checkpoint(net[:3], inp)
        return ckbn.checkpoint(net[3:], h)

    return ckbn.checkpoint(outer, x)


RUNS = [
    reentrant,
    non_reentrant,
    torch_sequential,
    torch_sequential_reentrant,
    ckbn_whole,
    ckbn_sequential,
    ckbn_nested,
]


@pytest.mark.parametrize("run", RUNS, ids=[r.__name__ for r in RUNS])
def test_running_stats_exact_under_checkpoint(run):
    oracle = make_net()
    oracle_grads = train(oracle, plain)
    net = make_net()
    grads = train(net, run)
    assert_same_state(net, oracle, grads, oracle_grads)
    assert checkpointing._frames() == []


@pytest.mark.parametrize("run", [reentrant, non_reentrant], ids=["reentrant", "non_reentrant"])
def test_torch_batchnorm_drifts_under_checkpoint(run):
    """The problem ckbn fixes, asserted so that the exactness tests above can fail."""
    oracle = make_net(torch.nn.BatchNorm2d)
    train(oracle, plain)
    net = make_net(torch.nn.BatchNorm2d)
    train(net, run)
    assert net[1].num_batches_tracked.item() == 2 * STEPS
    assert (net[1].running_mean - oracle[1].running_mean).abs().max() > 1e-3


class Capture(torch.nn.Module):
    """Records every tensor that passes through it, forward and recompute alike."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x


def test_ckbn_checkpoint_replays_bitwise_without_stats_pass(monkeypatch):
    torch.manual_seed(0)
    capture = Capture()
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), ckbn.BatchNorm2d(8), capture, torch.nn.ReLU())
    stats_calls = counting(monkeypatch, "batch_stats")
    update_calls = counting(monkeypatch, "update_running_stats")
    x = torch.randn(4, 3, 9, 9, requires_grad=True)
    y = ckbn.checkpoint(block, x)
    assert len(stats_calls) == 1 and len(update_calls) == 1
    y.sum().backward()
    assert len(capture.seen) == 2, "the recompute ran"
    assert torch.equal(capture.seen[0], capture.seen[1]), "recomputed BatchNorm output must be bitwise equal"
    assert len(stats_calls) == 1, "the recompute must not compute statistics"
    assert len(update_calls) == 1


def test_plain_checkpoint_recomputes_stats_but_updates_once(monkeypatch):
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), ckbn.BatchNorm2d(8))
    stats_calls = counting(monkeypatch, "batch_stats")
    update_calls = counting(monkeypatch, "update_running_stats")
    x = torch.randn(4, 3, 9, 9, requires_grad=True)
    non_reentrant(block, x).sum().backward()
    assert len(stats_calls) == 2 and len(update_calls) == 1


@pytest.mark.parametrize("early_stop", [True, False], ids=["early_stop", "full_recompute"])
def test_early_stopped_recompute_leaves_no_frames(early_stop):
    net = make_net()
    oracle = make_net()
    train(oracle, plain)
    with torch_checkpoint.set_checkpoint_early_stop(early_stop):
        train(net, ckbn_nested)
    assert_same_state(net, oracle)
    assert checkpointing._frames() == []


def test_forward_without_backward_leaks_nothing():
    net = make_net()
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    y = ckbn.checkpoint(net, x)
    assert checkpointing._frames() == []
    record = y.grad_fn  # the record lives only as long as the graph that needs it
    del y, record
    gc.collect()
    oracle = make_net()
    oracle(x)
    # The un-backpropagated forward still counted once.
    assert net[1].num_batches_tracked.item() == 1
    torch.testing.assert_close(net[1].running_mean, oracle[1].running_mean)


def test_backward_twice_with_retain_graph_replays_twice():
    net = make_net()
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    y = ckbn.checkpoint(net, x).sum()
    y.backward(retain_graph=True)
    first = x.grad.clone()
    y.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    assert net[1].num_batches_tracked.item() == 1


def test_recompute_that_calls_batchnorm_differently_fails_clearly():
    bn = ckbn.BatchNorm2d(4)
    calls = []

    def data_dependent(x):
        calls.append(1)
        y = bn(x)
        if len(calls) > 1:  # the recompute takes another path
            y = bn(y)
        return y

    # Without early stop the recompute runs to the extra call (with it, it would stop before).
    with torch_checkpoint.set_checkpoint_early_stop(False):
        y = ckbn.checkpoint(data_dependent, torch.randn(3, 4, 2, 2, requires_grad=True))
    with pytest.raises(RuntimeError, match="same BatchNorm layers"):
        y.sum().backward()
    assert checkpointing._frames() == []


def test_ckbn_checkpoint_under_no_grad_updates_once():
    net = make_net()
    with torch.no_grad():
        ckbn.checkpoint(net, torch.randn(4, 3, 6, 6))
    assert net[1].num_batches_tracked.item() == 1


def test_eval_mode_under_checkpoint_records_nothing():
    net = make_net().eval()
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    expected = net(x)
    y = ckbn.checkpoint(net, x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert net[1].num_batches_tracked.item() == 0


def test_forward_inside_backward_hook_needs_the_override():
    """The documented misreading: a training forward run from a backward hook looks like a recompute."""
    side = ckbn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)

    def run_side(grad, override):
        if override:
            with ckbn.update_running_stats_in_backward():
                side(torch.randn(4, 3, 2, 2))
        else:
            side(torch.randn(4, 3, 2, 2))

    for override, expected in ((False, 0), (True, 1)):
        y = x * 2
        y.register_hook(lambda grad: run_side(grad, override))
        y.sum().backward()
        assert side.num_batches_tracked.item() == expected


def test_detection_falls_back_without_private_call(monkeypatch):
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    assert checkpointing.in_backward_pass() is False
    bn = ckbn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    assert bn.num_batches_tracked.item() == 1


def test_checkpoint_sequential_segmentation_matches_torch():
    """Same split as torch's checkpoint_sequential, with the last segment checkpointed too."""
    seen = []

    def tag(i):
        def f(x):
            seen.append(i)
            return x.sin()  # saves its input, so the segment is recomputed

        return f

    functions = [tag(i) for i in range(7)]
    x = torch.randn(2, requires_grad=True)
    ckbn.checkpoint_sequential(functions, 3, x).sum().backward()
    # 3 segments of 7: [0,1], [2,3], [4,5,6]; forward then a recompute of each segment, last first.
    assert seen[:7] == list(range(7))
    assert seen[7:] == [4, 5, 6, 2, 3, 0, 1]


def test_ckbn_checkpoint_rejects_reentrant_and_custom_context():
    with pytest.raises(ValueError):
        ckbn.checkpoint(lambda x: x, torch.randn(2), use_reentrant=True)
    with pytest.raises(TypeError):
        ckbn.checkpoint(lambda x: x, torch.randn(2), context_fn=None)


def test_deepcopied_model_is_independent():
    net = make_net()
    twin = copy.deepcopy(net)
    train(net, ckbn_whole)
    assert twin[1].num_batches_tracked.item() == 0
