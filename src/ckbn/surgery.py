"""Model surgery shared by :func:`ckbn.convert_model`, :func:`ckbn.fuse`,
:meth:`ckbn.SyncBatchNorm.convert_sync_batchnorm` and :func:`ckbn.frozen_running_stats`: moving a
layer's tensors into another class, replacing submodules, and the one rule for which normalization
layers ckbn can take over.

It depends on torch alone, so that every module above it can use it.
"""

from __future__ import annotations

from typing import Callable, Optional, Type

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def is_ckbn_batch_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs ckbn's BatchNorm forward: a ckbn class, or another library's subclass
    converted in place (its instance ``forward`` is a :class:`ckbn.policy.BatchNormForward`)."""
    if getattr(vars(module).get("forward"), "is_ckbn_forward", False):
        return True
    return any(cls.__module__.startswith("ckbn.") for cls in type(module).__mro__)


def has_torch_forward(module: torch.nn.Module) -> bool:
    """Whether ``module``'s class computes torch's own BatchNorm forward (a subclass that only adds
    methods, attributes or an input check), so that ckbn's forward computes the same."""
    return isinstance(module, _BatchNorm) and type(module).forward is _BatchNorm.forward


def why_not_convertible(module: torch.nn.Module) -> Optional[str]:
    """Why ckbn leaves a ``_BatchNorm`` with running statistics as it is, or None when it can convert it.

    A subclass with a forward of its own (detectron2's NaiveSyncBatchNorm, mmcv-style wrappers) may
    compute something else with the statistics or communicate them; replacing that forward would
    change the layer, so it is never replaced. torch's ``SyncBatchNorm`` and timm's norm + activation
    layers are the exceptions ckbn knows: they convert to ckbn's own equivalents.
    """
    if not isinstance(module, _BatchNorm) or is_ckbn_batch_norm(module) or has_torch_forward(module):
        return None
    cls = type(module)
    if cls is torch.nn.SyncBatchNorm or is_timm_layer(module, "BatchNormAct2d", "SyncBatchNormAct"):
        return None
    return (
        f"{cls.__module__}.{cls.__qualname__} has a forward of its own, which ckbn cannot take over "
        "without changing what the layer computes"
    )


def keeps_running_stats(module: torch.nn.Module) -> bool:
    """Whether a training forward of ``module`` updates running statistics (and so can count twice)."""
    return isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None


def is_timm_layer(module: torch.nn.Module, *names: str) -> bool:
    """Whether ``module``'s class is one of timm's ``names`` (checked without importing timm)."""
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("timm.")


def transplant(source: _BatchNorm, target_cls: Type, **kwargs) -> torch.nn.Module:
    """A ``target_cls`` sharing ``source``'s parameters and buffers (the same tensors, so an
    optimizer built on the old model keeps working; for a lazy module, the same uninitialised ones,
    materialised in place) and its training flag. ``kwargs`` go to the ``target_cls`` constructor."""
    lazy = issubclass(target_cls, torch.nn.modules.lazy.LazyModuleMixin)
    target = target_cls(
        *(() if lazy else (source.num_features,)),
        eps=source.eps,
        momentum=source.momentum,
        affine=source.affine,
        track_running_stats=source.track_running_stats,
        device="meta",
        **kwargs,
    )
    with torch.no_grad():
        # Every slot of either module, in source's order: a slot source lacks (bias=False) is None.
        for name in dict.fromkeys([*source._parameters, *target._parameters]):
            target.register_parameter(name, source._parameters.get(name))  # requires_grad comes along
        for name in dict.fromkeys([*source._buffers, *target._buffers]):
            persistent = name not in source._non_persistent_buffers_set
            target.register_buffer(name, source._buffers.get(name), persistent=persistent)
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def replace_modules(module: torch.nn.Module, replacement: Callable[[torch.nn.Module], Optional[torch.nn.Module]]):
    """``module`` with every submodule for which ``replacement`` returns a module replaced by it,
    recursively; a new object when ``module`` itself is replaced. A module ``replacement`` returns
    is not searched further."""
    replaced = replacement(module)
    if replaced is not None:
        return replaced
    for name, child in module.named_children():
        converted = replace_modules(child, replacement)
        if converted is not child:
            setattr(module, name, converted)
    return module


__all__ = [
    "is_ckbn_batch_norm",
    "has_torch_forward",
    "is_timm_layer",
    "keeps_running_stats",
    "replace_modules",
    "transplant",
    "why_not_convertible",
]
