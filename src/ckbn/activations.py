"""The activations a ckbn BatchNorm can fuse, by name, and their plain-PyTorch definitions.

A fused layer computes ``activation(batch_norm(x))`` in one pass. The operators take the activation
as a name and one float parameter (the negative slope of ``leaky_relu``; ignored by the others).
The functions here are the definitions the kernels are held to, and the differentiable route used
for forward-mode AD and double backward; each is torch's own, so gradients match torch's modules.
"""

from __future__ import annotations

import numbers
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "silu", "hardswish")

# torch.nn.LeakyReLU's default slope.
DEFAULT_LEAKY_RELU_SLOPE = 0.01


def canonical(activation: str, activation_param=None) -> Tuple[str, float]:
    """``(name, param)`` as the operators take them, or a ValueError naming what is wrong.

    ``activation_param`` is leaky_relu's negative slope (default 0.01); other activations take none.
    """
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, but got {activation!r}")
    if activation == "leaky_relu":
        if activation_param is None:
            return activation, DEFAULT_LEAKY_RELU_SLOPE
        if isinstance(activation_param, bool) or not isinstance(activation_param, numbers.Real):
            raise ValueError(f"leaky_relu's negative slope must be a real number, but got {activation_param!r}")
        return activation, float(activation_param)
    if activation_param not in (None, 0, 0.0):
        raise ValueError(f"activation {activation!r} takes no parameter, but got {activation_param!r}")
    return activation, 0.0


def apply(z: Tensor, activation: str, activation_param: float = 0.0) -> Tensor:
    """``activation(z)`` with torch's functions (differentiable, to any order)."""
    if activation == "identity":
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "relu6":
        return F.relu6(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, activation_param)
    if activation == "silu":
        return F.silu(z)
    if activation == "hardswish":
        return F.hardswish(z)
    raise ValueError(f"unknown activation {activation!r}")


def derivative(z: Tensor, activation: str, activation_param: float = 0.0) -> Tensor:
    """d activation / dz at ``z``, with torch's conventions at the kinks (its backward's values)."""
    if activation == "identity":
        return torch.ones_like(z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if activation == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, activation_param))
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "hardswish":
        # torch's hardswish_backward: 0 up to -3 inclusive, x/3 + 1/2 strictly inside, 1 from 3 on.
        return torch.where(z <= -3, torch.zeros_like(z), torch.where(z < 3, z / 3 + 0.5, torch.ones_like(z)))
    raise ValueError(f"unknown activation {activation!r}")
