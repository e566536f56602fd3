"""A torch BatchNorm and its ckbn twin, each followed by a fused activation: the pair the autograd and
torch.func tests compare."""

import copy

import pytest
import torch

import ckbn
from ckbn import activations
from ckbn.policy import batch_norm_forward

# Fused activations the ops implement; the fused-activation branch extends this list.
ACTIVATIONS_UNDER_TEST = ["identity"]

TORCH_CLASSES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


class Fused(torch.nn.Module):
    """``activation(bn(x))``: in one ckbn forward, or torch's BatchNorm followed by torch's activation."""

    def __init__(self, bn, activation):
        super().__init__()
        self.bn = bn
        self.activation, self.activation_param = activations.canonical(activation)

    def forward(self, x):
        if isinstance(self.bn, (ckbn.BatchNorm1d, ckbn.BatchNorm2d, ckbn.BatchNorm3d)):
            return batch_norm_forward(self.bn, x, activation=self.activation, activation_param=self.activation_param)
        return activations.apply(self.bn(x), self.activation, self.activation_param)


def make_pair(shape, affine, train, activation, device, dtype=torch.float64, **bn_kwargs):
    """(torch's model, ckbn's model) for input of ``shape``: the same random affine parameters and
    running statistics. ``bn_kwargs`` go to torch's BatchNorm constructor."""
    gen = torch.Generator().manual_seed(sum(shape))
    channels = shape[1]
    bn = TORCH_CLASSES[len(shape)](channels, affine=affine, dtype=dtype, **bn_kwargs)
    with torch.no_grad():
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(channels, generator=gen))
            bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
        if affine:
            bn.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(channels, generator=gen))
    bn.train(train)
    theirs = Fused(bn, activation).to(device)
    return theirs, Fused(ckbn.convert_model(copy.deepcopy(bn)), activation).to(device)


def assert_same_buffers(ours, theirs):
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(a, b, msg=name)
