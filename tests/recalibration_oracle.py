"""The oracle of ckbn.recalibrate's tests, shared by the single-process ones (models/test_recalibrate.py)
and the distributed ones (modules/test_distributed.py): every layer's input captured in float64 over
the same batches, concatenated, and its mean and unbiased variance taken by torch."""

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

import ckbn


def batch_norm_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, _NormBase) and m.track_running_stats}


def population_statistics(model, batches):
    """{layer name: (mean, unbiased variance)} in float64 of every value each layer saw, the batches
    concatenated: the oracle, from inputs captured by forward hooks in training mode."""
    model = copy.deepcopy(model)  # the original's buffers stay untouched
    layers = batch_norm_layers(model)
    seen = {name: [] for name in layers}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[0].double().transpose(0, 1).reshape(m.num_features, -1))
        )
    training = model.training
    with torch.no_grad(), ckbn.frozen_running_stats(model):
        model.train()
        for batch in batches:
            model(batch)
    model.train(training)
    return {name: (torch.cat(v, 1).mean(1), torch.cat(v, 1).var(1, unbiased=True)) for name, v in seen.items()}


def assert_matches_population(model, expected, rtol):
    for name, layer in batch_norm_layers(model).items():
        mean, var = expected[name]
        scale = (mean.abs() + var.sqrt()).max().item()  # a mean near zero is judged on the data's scale
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=rtol, atol=rtol * scale, msg=name)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=rtol, atol=0, msg=name)


def shifted_batches(shape, sizes, dtype=torch.float64, memory_format=torch.contiguous_format, seed=0):
    """Batches of unequal sizes whose means differ: batch i is shifted by i and scaled by 1 + i/2."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i, size in enumerate(sizes):
        x = torch.randn(size, *shape, generator=generator, dtype=torch.float64) * (1 + i / 2) + i
        x = x.to(dtype)
        batches.append(x.contiguous(memory_format=memory_format) if x.dim() == 4 else x)
    return batches


def small_model(dim, channels=3):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    norm = {1: ckbn.BatchNorm1d, 2: ckbn.BatchNorm2d, 3: ckbn.BatchNorm3d}[dim]
    fused = {1: ckbn.BatchNormAct1d, 2: ckbn.BatchNormAct2d, 3: ckbn.BatchNormAct3d}[dim]
    torch.manual_seed(0)
    return nn.Sequential(norm(channels), conv(channels, 4, 1), fused(4, "silu"), conv(4, 4, 1), norm(4, momentum=None))
