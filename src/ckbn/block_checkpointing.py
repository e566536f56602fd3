"""ckbn.apply_checkpointing: checkpoint the blocks of an existing model in place, without editing its
code or its state_dict keys.

Each chosen block keeps its class, children and place in the model; its instance takes a forward
that runs the block's own forward under :func:`ckbn.checkpoint` in training mode with gradients
enabled, and directly otherwise (eval and ``torch.no_grad()`` recompute nothing). torch's
``checkpoint_wrapper`` instead inserts a module, which prefixes every key with
``_checkpoint_wrapped_module`` and breaks loading existing checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn

from .checkpointing import SavePolicy, checkpoint

# The checkpointing units of the model zoos, by (library, class name): residual blocks of ResNets,
# inverted-residual and MBConv blocks of MobileNets and EfficientNets, DenseNet's dense layers, and
# Ultralytics' blocks. Each is a unit of a few convolutions whose output is all that its successor
# needs, so that checkpointing it keeps one tensor per block.
DEFAULT_BLOCKS = {
    "torchvision": {"BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "FusedMBConv", "_DenseLayer"},
    "timm": {"BasicBlock", "Bottleneck", "InvertedResidual", "DepthwiseSeparableConv", "EdgeResidual", "DenseLayer"},
    "ultralytics": {"C2f", "C3", "C3k2", "C2PSA", "SPPF", "Bottleneck", "C2fAttn", "RepC3", "ELAN1", "RepNCSPELAN4"},
}


def is_default_block(module: nn.Module) -> bool:
    """Whether ``module`` is one of :data:`DEFAULT_BLOCKS`."""
    cls = type(module)
    return cls.__name__ in DEFAULT_BLOCKS.get(cls.__module__.split(".")[0], ())


class CheckpointedForward:
    """A block's forward run under :func:`ckbn.checkpoint` when it trains with gradients enabled.

    Set as the block instance's ``forward``; a class rather than a closure, so that the model still
    deep-copies and pickles (with a picklable ``save``).
    """

    def __init__(self, module: nn.Module, save=None) -> None:
        self.module = module
        self.own_forward = vars(module).get("forward")  # a forward set on the instance before (ckbn.fuse)
        self.save = save

    def __call__(self, *args, **kwargs):
        forward = self.own_forward or type(self.module).forward.__get__(self.module)
        if self.module.training and torch.is_grad_enabled():
            # A list argument is copied: its caller may append to it before the recompute (DenseNet's
            # blocks pass every layer the one list of features they grow).
            args = [list(arg) if isinstance(arg, list) else arg for arg in args]
            return checkpoint(forward, *args, save=self.save, **kwargs)
        return forward(*args, **kwargs)


def _out_of_place(block: nn.Module, prefix: str) -> List[str]:
    """Turn off ``inplace`` in ``block``'s modules (activations, dropout), by name.

    A selective policy keeps some outputs (a convolution's) instead of recomputing them; an in-place
    activation after it (timm's squeeze-excite) would change the kept tensor, which torch then
    refuses in the backward. Out of place, the values are the same.
    """
    changed = []
    for name, module in block.named_modules():
        if isinstance(getattr(module, "inplace", None), bool) and module.inplace:
            module.inplace = False
            changed.append(f"{prefix}.{name}" if name else prefix)
    return changed


@dataclass
class CheckpointingReport:
    """The blocks :func:`apply_checkpointing` wrapped, by qualified name, with their classes."""

    wrapped: List[str] = field(default_factory=list)
    classes: List[str] = field(default_factory=list)
    made_out_of_place: List[str] = field(default_factory=list)  # in-place modules inside, under a selective policy

    def __str__(self) -> str:
        classes = ", ".join(sorted(set(self.classes)))
        return f"ckbn.apply_checkpointing: {len(self.wrapped)} blocks checkpointed ({classes})"


def apply_checkpointing(
    model: nn.Module, check_fn: Optional[Callable[[nn.Module], bool]] = None, *, save: SavePolicy = None
) -> CheckpointingReport:
    """Checkpoint, in place, every block of ``model`` for which ``check_fn(module)`` is true (default:
    :func:`is_default_block`), outermost first: a chosen block's submodules are not looked at.

    ``save`` is :func:`ckbn.checkpoint`'s (None: recompute everything; ``"compute"``: keep
    convolutions and matrix products); with a policy, in-place activation and dropout modules inside
    the blocks are made out of place, as a kept output must not change afterwards. Apply it after
    :func:`ckbn.convert_model` and :func:`ckbn.fuse`, which leave modules with a forward set on the
    instance alone. Returns what was wrapped; a block wrapped already is not wrapped again.
    """
    check_fn = check_fn or is_default_block
    report = CheckpointingReport()

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qualified = f"{prefix}{name}"
            if check_fn(child):
                if not isinstance(vars(child).get("forward"), CheckpointedForward):
                    child.forward = CheckpointedForward(child, save)
                    report.wrapped.append(qualified)
                    report.classes.append(type(child).__name__)
                    if save is not None:
                        report.made_out_of_place += _out_of_place(child, qualified)
            else:
                visit(child, qualified + ".")

    visit(model, "")
    return report


__all__ = ["CheckpointedForward", "CheckpointingReport", "DEFAULT_BLOCKS", "apply_checkpointing", "is_default_block"]
