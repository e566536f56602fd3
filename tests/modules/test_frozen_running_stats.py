"""ckbn.frozen_running_stats: extra training-mode forwards that normalize with batch statistics but
count nothing.

The oracle for a SAM-style step (two forwards and backwards per batch, the second at perturbed
weights) is the same model run once per batch: its buffers must come out identical, with and
without checkpointing around either pass.
"""

import contextlib
import copy

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint

import ckbn
from ckbn import checkpointing

STEPS = 3


def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        ckbn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        ckbn.BatchNorm2d(8, momentum=None),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        ckbn.BatchNorm1d(8 * 36),
    )


def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 6, 6, generator=gen) * 2 + 1 for _ in range(STEPS)]


RUNS = {
    "plain": lambda net, x: net(x),
    "torch_reentrant": lambda net, x: torch_checkpoint.checkpoint(net, x, use_reentrant=True),
    "torch_non_reentrant": lambda net, x: torch_checkpoint.checkpoint(net, x, use_reentrant=False),
    "ckbn": lambda net, x: ckbn.checkpoint(net, x),
}


def sam_step(net, x, run_first, run_second, rho=0.05, freeze=True):
    """Sharpness-aware minimisation: ascend to w + e(w), take the gradient there, restore w."""
    run_first(net, x.requires_grad_()).square().mean().backward()
    params = [p for p in net.parameters() if p.grad is not None]
    norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
    originals = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(rho * p.grad / norm)
    net.zero_grad()
    with ckbn.frozen_running_stats(net) if freeze else contextlib.nullcontext():
        run_second(net, x).square().mean().backward()
    with torch.no_grad():
        for p, original in zip(params, originals):
            p.copy_(original)


@pytest.mark.parametrize("second", RUNS, ids=[f"second_{name}" for name in RUNS])
@pytest.mark.parametrize("first", RUNS, ids=[f"first_{name}" for name in RUNS])
def test_sam_step_buffers_identical_to_single_pass(first, second):
    oracle, net = make_net(), make_net()
    for x in batches():
        RUNS["plain"](oracle, x)
        sam_step(net, x.clone(), RUNS[first], RUNS[second])
    for (key, value), expected in zip(net.state_dict().items(), oracle.state_dict().values()):
        if key.endswith("num_batches_tracked"):
            assert value.item() == expected.item() == STEPS, key
        elif "running" in key:
            assert torch.equal(value, expected), key
    assert checkpointing._frames() == []


def test_sam_step_without_the_context_counts_twice():
    """What the test above guards against."""
    net = make_net()
    for x in batches():
        sam_step(net, x, RUNS["plain"], RUNS["plain"], freeze=False)
    assert net[1].num_batches_tracked.item() == 2 * STEPS


def test_second_pass_uses_batch_statistics():
    """Frozen is not eval mode: the output is normalized with the batch's own statistics."""
    net = make_net()
    x = torch.randn(4, 3, 6, 6)
    expected = copy.deepcopy(net)(x)
    with ckbn.frozen_running_stats(net):
        torch.testing.assert_close(net(x), expected)
    assert net[1].num_batches_tracked.item() == 0


def test_momentum_zero_is_not_a_substitute():
    """The workaround users reach for: momentum=0 still counts, and momentum=None still averages."""
    torch_bn = torch.nn.BatchNorm2d(3, momentum=0.0)
    torch_bn(torch.randn(4, 3, 2, 2))
    assert torch_bn.num_batches_tracked.item() == 1
    ours = ckbn.BatchNorm2d(3, momentum=None)
    with ckbn.frozen_running_stats(ours):
        ours(torch.randn(4, 3, 2, 2))
    assert ours.num_batches_tracked.item() == 0
    assert torch.equal(ours.running_mean, torch.zeros(3)) and torch.equal(ours.running_var, torch.ones(3))


def test_contexts_nest_and_unwind():
    net = make_net()
    x = torch.randn(4, 3, 6, 6)
    with ckbn.frozen_running_stats(net):
        with ckbn.frozen_running_stats(net[1]):
            net(x)
        net(x)  # net[1] still frozen by the outer context
    assert [m.num_batches_tracked.item() for m in (net[1], net[4], net[7])] == [0, 0, 0]
    assert not any("_ckbn_running_stats_frozen" in vars(m) for m in net.modules())
    with ckbn.frozen_running_stats(net[4]):  # only that layer
        net(x)
    assert [m.num_batches_tracked.item() for m in (net[1], net[4], net[7])] == [1, 0, 1]


def test_context_unwinds_on_exception():
    bn = ckbn.BatchNorm2d(3)
    with pytest.raises(ValueError), ckbn.frozen_running_stats(bn):
        bn(torch.randn(1, 3, 1, 1))
    bn(torch.randn(4, 3, 2, 2))
    assert bn.num_batches_tracked.item() == 1


def test_checkpoint_inside_the_context_replays_and_counts_nothing():
    """ckbn.checkpoint opened inside the context, its recompute run after the context closed."""
    net = make_net()
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    with ckbn.frozen_running_stats(net):
        y = ckbn.checkpoint(net, x)
    y.sum().backward()
    assert net[1].num_batches_tracked.item() == 0


def test_context_inside_a_checkpointed_function():
    net = make_net()
    oracle = make_net()

    def consistency(x):
        with ckbn.frozen_running_stats(net):
            extra = net(x * 0.5)
        return net(x) + extra

    for x in batches():
        oracle(x)
        ckbn.checkpoint(consistency, x.requires_grad_()).sum().backward()
    for key, value in net.state_dict().items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(value, oracle.state_dict()[key]), key


def test_sync_batchnorm_and_lazy_modules_freeze():
    sync, lazy = ckbn.SyncBatchNorm(3), ckbn.LazyBatchNorm2d()
    for module in (sync, lazy):
        with ckbn.frozen_running_stats(module):
            module(torch.randn(4, 3, 2, 2))
        assert module.num_batches_tracked.item() == 0


def test_eval_mode_forward_is_untouched():
    bn = ckbn.BatchNorm2d(3).eval()
    x = torch.randn(4, 3, 2, 2)
    expected = bn(x)
    with ckbn.frozen_running_stats(bn):
        torch.testing.assert_close(bn(x), expected)


def test_torch_batchnorm_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="1 is a BatchNorm2d.*ckbn.convert_model"):
        with ckbn.frozen_running_stats(model):
            pass
    with ckbn.frozen_running_stats(ckbn.convert_model(model)):
        model(torch.randn(4, 3, 2, 2))
    assert model[1].num_batches_tracked.item() == 0


def test_fused_layers_are_frozen_too():
    layer = ckbn.BatchNormAct2d(3, "silu")
    with ckbn.frozen_running_stats(torch.nn.Sequential(layer)):
        layer(torch.randn(4, 3, 2, 2))
    assert layer.num_batches_tracked.item() == 0 and torch.equal(layer.running_var, torch.ones(3))
    layer(torch.randn(4, 3, 2, 2))
    assert layer.num_batches_tracked.item() == 1
