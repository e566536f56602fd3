"""ckbn.checkpoint(save=...): torch's selective checkpointing composed with the replay of BatchNorm
statistics. Under every policy: outputs, gradients and running statistics equal torch's BatchNorm
model unchecked (float64), the recompute runs no statistics pass, and what the policy keeps is not
recomputed. SyncBatchNorm over 2 gloo ranks is in test_distributed.py (collective_counts).
"""

import copy

import pytest
import torch
from helpers import counting
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

import ckbn

aten = torch.ops.aten


class OpCounts(TorchDispatchMode):
    """How often each op runs inside the block."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def keep_convolutions(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op is aten.convolution.default else CheckpointPolicy.PREFER_RECOMPUTE


# save -> how many convolutions the recompute of the model below runs
POLICIES = {
    "everything recomputed": (None, 2),
    "compute": ("compute", 0),
    "a set of ops": ({aten.convolution.default}, 0),
    "a policy callable": (keep_convolutions, 0),
    "matmuls only": ([aten.mm.default], 2),
}


def torch_model(fused_activation):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4, momentum=None),
        nn.SiLU(),
    ).double()


def ckbn_model(truth, fused):
    return ckbn.convert_model(copy.deepcopy(truth), fuse_activations=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_is_exact_and_replays(policy, fused, monkeypatch):
    save, recomputed_convolutions = POLICIES[policy]
    truth = torch_model(fused)
    ours = ckbn_model(truth, fused)
    batch_stats = counting(monkeypatch, "batch_stats")
    for step in range(2):
        x = torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        x_truth, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        truth(x_truth).square().sum().backward()
        y = ckbn.checkpoint(ours, x_ours, save=save)
        calls_in_forward = len(batch_stats)
        with OpCounts() as ops:
            y.square().sum().backward()
        assert len(batch_stats) == calls_in_forward, "the recompute ran a statistics pass"
        assert ops.counts.get(aten.convolution.default, 0) == recomputed_convolutions
        torch.testing.assert_close(x_ours.grad, x_truth.grad, rtol=1e-12, atol=1e-12)
    for (name, ours_tensor), truth_tensor in zip(ours.state_dict().items(), truth.state_dict().values()):
        torch.testing.assert_close(ours_tensor, truth_tensor, rtol=1e-12, atol=1e-12, msg=name)
    for p_ours, p_truth in zip(ours.parameters(), truth.parameters()):
        torch.testing.assert_close(p_ours.grad, p_truth.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("save", [None, "compute"])
def test_recompute_is_bitwise_the_forward(save):
    model = ckbn_model(torch_model(True), fused=True)
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    recomputed = []
    # the first fused layer: the next convolution saves its output, so the recompute runs it
    hook = model[1].register_forward_hook(lambda m, args, output: recomputed.append(output.detach().clone()))
    ckbn.checkpoint(model, x, save=save).sum().backward()
    hook.remove()
    assert len(recomputed) == 2 and torch.equal(recomputed[0], recomputed[1])


def test_checkpoint_sequential_passes_save_on():
    truth = torch_model(False)
    ours = ckbn_model(truth, fused=False)
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64)
    x_truth, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    truth(x_truth).sum().backward()
    y = ckbn.checkpoint_sequential(ours, 2, x_ours, save="compute")
    with OpCounts() as ops:
        y.sum().backward()
    assert ops.counts.get(aten.convolution.default, 0) == 0
    torch.testing.assert_close(x_ours.grad, x_truth.grad, rtol=1e-12, atol=1e-12)
    assert ours[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("save", ["everything", 3])
def test_unknown_save_is_refused(save):
    with pytest.raises((ValueError, TypeError)):
        ckbn.checkpoint(nn.Identity(), torch.randn(2, requires_grad=True), save=save)
