"""ckbn.convert_model: every normalization layer of a model whose running statistics ckbn can keep
exact becomes ckbn's, and the report says what was left and why.

What converts, sharing its parameters and buffers and keeping its training flag:

* torch's ``BatchNorm1d/2d/3d`` and ``LazyBatchNorm1d/2d/3d``: to ckbn's classes of the same names;
* torch's ``SyncBatchNorm``: to :class:`ckbn.SyncBatchNorm`, with its process group;
* timm's ``BatchNormAct2d``: to a fused :class:`ckbn.BatchNormAct2d` when ckbn has its activation
  and it has no dropout, else to :class:`BatchNormDropAct2d` (ckbn's BatchNorm, then the layer's own
  ``drop`` and ``act`` modules); timm's ``SyncBatchNormAct``: to :class:`SyncBatchNormDropAct`;
* any other ``_BatchNorm`` subclass whose forward is torch's own: in place, the instance taking
  ckbn's forward (its class, methods and attributes stay).

What is left: layers that update no running statistics (``track_running_stats=False``,
torchvision's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``), which need no fix, and
``_BatchNorm`` subclasses with a forward of their own (:func:`ckbn.surgery.why_not_convertible`),
which would still count a checkpointed batch twice: those are logged as a warning, or refused
with ``strict=True``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from torch import Tensor, nn

from . import fusion, modules, policy, surgery
from .distributed import SyncBatchNorm

logger = logging.getLogger(__name__)

_TORCH_TO_CKBN = {
    nn.BatchNorm1d: modules.BatchNorm1d,
    nn.BatchNorm2d: modules.BatchNorm2d,
    nn.BatchNorm3d: modules.BatchNorm3d,
    # A materialised torch lazy module has become torch.nn.BatchNorm*d and converts as one.
    nn.LazyBatchNorm1d: modules.LazyBatchNorm1d,
    nn.LazyBatchNorm2d: modules.LazyBatchNorm2d,
    nn.LazyBatchNorm3d: modules.LazyBatchNorm3d,
}


class _ThenDropAndAct:
    """A ckbn BatchNorm followed by the ``drop`` and ``act`` children it holds, as timm's norm +
    activation layers hold them (so the state_dict keys, ``act.weight`` of a PReLU included, stay)."""

    def forward(self, input: Tensor) -> Tensor:
        output = super().forward(input)
        for name in ("drop", "act"):  # timm's SyncBatchNormAct may lack either
            if name in self._modules:
                output = self._modules[name](output)
        return output


class BatchNormDropAct2d(_ThenDropAndAct, modules.BatchNorm2d):
    """What timm's ``BatchNormAct2d`` computes, on ckbn's BatchNorm: ``act(drop(batch_norm(x)))``,
    for the drops and activations ckbn does not fuse. Still a ``BatchNorm2d``, as timm's is."""


class SyncBatchNormDropAct(_ThenDropAndAct, SyncBatchNorm):
    """What timm's ``SyncBatchNormAct`` computes, on :class:`ckbn.SyncBatchNorm`."""


@dataclass
class ConversionReport:
    """What :func:`convert_model` did, by the layers' qualified names in the model it was given."""

    converted: Dict[str, str] = field(default_factory=dict)  # name -> "its class -> ckbn's"
    left: Dict[str, str] = field(default_factory=dict)  # name -> why it is as it was
    counts_twice: List[str] = field(
        default_factory=list
    )  # names in left whose statistics a checkpoint still updates twice

    def __str__(self) -> str:
        lines = [f"ckbn.convert_model: {len(self.converted)} layers converted, {len(self.left)} left"]
        lines += [
            f"  left {name}: {reason}" + (" (counts a checkpointed batch twice)" if name in self.counts_twice else "")
            for name, reason in self.left.items()
        ]
        return "\n".join(lines)


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


def _convert_timm_batch_norm_act(module: nn.Module) -> nn.Module:
    fused, _ = fusion.fuse_timm_batch_norm_act(module)
    if fused is not None:
        return fused
    converted = surgery.transplant(module, BatchNormDropAct2d)
    converted.drop, converted.act = module.drop, module.act
    return converted


def _convert_sync_batch_norm(module: nn.SyncBatchNorm, cls=SyncBatchNorm) -> nn.Module:
    converted = surgery.transplant(module, cls, process_group=module.process_group)
    for name in ("drop", "act"):
        if name in module._modules:
            converted.add_module(name, module._modules[name])
    return converted


def _converted(module: nn.Module) -> Optional[nn.Module]:
    """ckbn's equivalent of ``module`` (sharing its tensors), or None when ckbn leaves it."""
    cls = type(module)
    if surgery.is_ckbn_batch_norm(module):
        return None
    if cls in _TORCH_TO_CKBN:
        return surgery.transplant(module, _TORCH_TO_CKBN[cls])
    if cls is nn.SyncBatchNorm:
        return _convert_sync_batch_norm(module)
    if surgery.is_timm_layer(module, "BatchNormAct2d"):
        return _convert_timm_batch_norm_act(module)
    if surgery.is_timm_layer(module, "SyncBatchNormAct"):
        return _convert_sync_batch_norm(module, SyncBatchNormDropAct)
    if surgery.has_torch_forward(module):
        module.forward = policy.BatchNormForward(module)
        return module
    return None


def _left_reason(module: nn.Module) -> Optional[str]:
    """Why a normalization layer ckbn leaves needs no conversion or cannot have one; None for
    modules that are no normalization layer."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not surgery.keeps_running_stats(module):
            return "keeps no running statistics: nothing to count twice"
        return surgery.why_not_convertible(module)
    buffers = module._buffers
    if "running_mean" in buffers and "running_var" in buffers and "Frozen" in type(module).__name__:
        return "frozen statistics, never updated: nothing to count twice"
    return None


def convert_model(
    module: nn.Module, fuse_activations: bool = False, *, return_report: bool = False, strict: bool = False
) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Convert every normalization layer of ``module`` whose running statistics ckbn can keep exact
    (see the module docstring for which and to what), recursively.

    With ``fuse_activations=True``, first :func:`ckbn.fuse` each BatchNorm whose only consumer is an
    activation into one ``ckbn.BatchNormAct*d`` module, then convert the rest.

    Parameters and buffers are shared, not copied, and ``requires_grad`` and the training flag are
    kept. Returns the converted module (a new object when ``module`` itself is a BatchNorm), like
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, or ``(module, ConversionReport)`` with
    ``return_report=True``. A layer left that still counts a checkpointed batch twice is logged as a
    warning on the ``ckbn.conversion`` logger; with ``strict=True`` it is a TypeError, raised before
    anything is changed.
    """
    report = ConversionReport()
    for name, child in module.named_modules():
        reason = _left_reason(child) if not surgery.is_ckbn_batch_norm(child) else None
        if reason is not None:
            report.left[name or "(the model itself)"] = reason
            if surgery.keeps_running_stats(child):
                report.counts_twice.append(name or "(the model itself)")
    if report.counts_twice:
        listing = "; ".join(f"{name}: {report.left[name]}" for name in report.counts_twice)
        if strict:
            raise TypeError(
                f"ckbn.convert_model(strict=True): these layers would still count a checkpointed batch twice: {listing}"
            )
        logger.warning("ckbn.convert_model left layers that still count a checkpointed batch twice: %s", listing)

    if fuse_activations:
        module, fuse_report = fusion.fuse(module, return_report=True)
        report.converted.update({name: f"fused with {act}" for name, act in fuse_report.fused.items()})

    names = {id(child): name or "(the model itself)" for name, child in module.named_modules()}

    def replacement(child: nn.Module) -> Optional[nn.Module]:
        before = _class_name(child)
        converted = _converted(child)
        if converted is child:
            report.converted[names[id(child)]] = f"{before}, in place (ckbn's forward)"
        elif converted is not None:
            after = _class_name(converted)
            if getattr(converted, "activation", "identity") != "identity":
                after += f"({converted.activation})"
            report.converted.setdefault(names[id(child)], f"{before} -> {after}")
        return converted

    module = surgery.replace_modules(module, replacement)
    return (module, report) if return_report else module


__all__ = ["BatchNormDropAct2d", "ConversionReport", "SyncBatchNormDropAct", "convert_model"]
