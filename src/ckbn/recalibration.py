"""ckbn.recalibrate: running statistics set to the exact population statistics of a data set.

``torch.optim.swa_utils.update_bn`` and "precise BN" (fvcore, detectron2, pycls) set
``momentum=None`` and average per-batch statistics: the mean of the batch variances, which leaves out
the spread of the batch means (law of total variance), and across processes each rank keeps its own
estimate. :func:`recalibrate` instead merges every batch's (count, mean, M2) per channel with Chan's
formula in float64, and across processes in one collective, so each layer ends with the mean and
unbiased variance of all the values it saw, as if every batch had been one.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from . import surgery
from .distributed import all_gather_rows
from .running_stats import frozen_running_stats


class _PopulationStatistics:
    """Per-channel (count, mean, M2) of every value one layer saw, in float64."""

    def __init__(self) -> None:
        self.batches = 0
        self.count = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def add(self, input: Tensor) -> None:
        channels = input.size(1)
        values = input.detach().transpose(0, 1).reshape(channels, -1).double()
        count = values.size(1)
        if count == 0:
            return
        mean = values.mean(1)
        m2 = (values - mean[:, None]).square().sum(1)
        self.merge(count, mean, m2)
        self.batches += 1

    def merge(self, count: int, mean: Tensor, m2: Tensor) -> None:
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean.clone(), m2.clone()
            return
        total = self.count + count
        delta = mean - self.mean
        # Chan et al.: the merged M2 adds the spread between the two means.
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The ckbn layers whose running statistics are recalibrated, by name; a TypeError for any other
    BatchNorm that keeps running statistics (it cannot be kept from updating them itself)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, _NormBase) and surgery.is_ckbn_batch_norm(module):
            if module.track_running_stats and module.running_mean is not None:
                layers[name] = module
        elif surgery.keeps_running_stats(module):
            raise TypeError(
                f"ckbn.recalibrate: {name or 'the model'} is a {type(module).__name__}, whose running statistics "
                "ckbn cannot recalibrate; convert the model with ckbn.convert_model first"
            )
    return layers


def _process_group(process_group):
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _merge_across_ranks(statistics: List[_PopulationStatistics], layers: List[nn.Module], group) -> None:
    """Every rank's statistics merged into ``statistics``, identically on every rank: one all_gather
    of all layers packed as (batches, count, mean[C], M2[C]) per layer, merged in rank order."""
    device = layers[0].running_mean.device
    frame = []
    for stats, layer in zip(statistics, layers):
        channels = layer.num_features
        mean = stats.mean if stats.mean is not None else torch.zeros(channels, dtype=torch.float64)
        m2 = stats.m2 if stats.m2 is not None else torch.zeros(channels, dtype=torch.float64)
        frame += [torch.tensor([stats.batches, stats.count], dtype=torch.float64), mean.cpu(), m2.cpu()]
    rows = all_gather_rows(torch.cat(frame).to(device), group).cpu()
    for index, layer in enumerate(layers):
        merged = _PopulationStatistics()
        offset = sum(2 + 2 * other.num_features for other in layers[:index])
        channels = layer.num_features
        for row in rows:
            batches, count = int(row[offset]), int(row[offset + 1])
            if count:
                merged.merge(
                    count,
                    row[offset + 2 : offset + 2 + channels],
                    row[offset + 2 + channels : offset + 2 + 2 * channels],
                )
                merged.batches += batches
        statistics[index] = merged


def _progress(iterable: Iterable, total: Optional[int]):
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(iterable, total)
    return tqdm(iterable, total=total, desc="ckbn.recalibrate")


def _plain_progress(iterable: Iterable, total: Optional[int]):
    for done, item in enumerate(iterable, 1):
        yield item
        print(f"\rckbn.recalibrate: batch {done}" + (f"/{total}" if total else ""), end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def recalibrate(
    model: nn.Module,
    data: Iterable,
    *,
    num_batches: Optional[int] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    process_group: Optional[Any] = None,
    progress: Optional[bool] = None,
) -> nn.Module:
    """Set the running statistics of every ckbn BatchNorm layer of ``model`` (plain, fused,
    SyncBatchNorm, lazy) to the exact mean and unbiased variance of all the values it saw over the
    batches of ``data``, as if they had been one batch; returns ``model``.

    The forwards run in training mode under ``torch.no_grad()``, so each layer normalizes with its
    batch statistics as in training (a SyncBatchNorm with the group's), and update no buffer; the
    statistics are accumulated in float64 whatever the input dtype. ``num_batches_tracked`` is set
    to the number of non-empty batches the layer saw (over every rank): the count that
    ``momentum=None`` would have reached. A layer that saw no value keeps its buffers.

    ``forward(model, batch)`` calls the model (default: ``model(batch)``, ``model(batch[0])`` for a
    tuple or list, ``model(**batch)`` for a dict); ``num_batches`` stops early. With a process group
    (or an initialised default one) every rank ends with the statistics of the union of all ranks'
    data, uneven and empty shards included, after one collective. ``progress=True`` shows a progress
    bar (tqdm if installed) on rank 0.

    Nothing else changes: parameters, other buffers, training flags, ``momentum``, and the RNG
    state (restored, so dropout draws do not shift later ones). If anything raises, every buffer is
    as it was. A torch BatchNorm that keeps running statistics is a TypeError: convert the model
    with :func:`ckbn.convert_model` first.
    """
    layers = _layers(model)
    statistics = {name: _PopulationStatistics() for name in layers}
    hooks = [
        layer.register_forward_pre_hook(lambda module, args, stats=statistics[name]: stats.add(args[0]))
        for name, layer in layers.items()
    ]
    group = _process_group(process_group)
    leader = group is None or dist.get_rank(group) == 0
    forward = forward or _default_forward
    batches = data
    if progress and leader:
        total = num_batches if num_batches is not None else (len(data) if hasattr(data, "__len__") else None)
        batches = _progress(data, total)
    training = {module: module.training for module in model.modules()}
    rng_state = torch.get_rng_state()
    cuda_rng_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.train()
        with torch.no_grad(), frozen_running_stats(model):
            for index, batch in enumerate(batches):
                if num_batches is not None and index >= num_batches:
                    break
                forward(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
        for module, flag in training.items():
            module.training = flag
        torch.set_rng_state(rng_state)
        if cuda_rng_states is not None:
            torch.cuda.set_rng_state_all(cuda_rng_states)

    names = list(layers)
    merged = [statistics[name] for name in names]
    if group is not None and dist.get_world_size(group) > 1 and names:
        _merge_across_ranks(merged, [layers[name] for name in names], group)
    with torch.no_grad():
        for name, stats in zip(names, merged):
            layer = layers[name]
            if stats.count == 0:
                continue
            # One value per channel has no unbiased variance; training would have refused that batch.
            variance = stats.m2 / (stats.count - 1) if stats.count > 1 else torch.zeros_like(stats.m2)
            layer.running_mean.copy_(stats.mean)
            layer.running_var.copy_(variance)
            if layer.num_batches_tracked is not None:
                layer.num_batches_tracked.fill_(stats.batches)
    return model


__all__ = ["recalibrate"]
