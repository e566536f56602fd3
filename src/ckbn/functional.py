"""ckbn.functional.batch_norm: torch.nn.functional.batch_norm on the ckbn operators.

For code that holds its own buffers (custom layers, meta-learning loops). Signature, results and
errors are torch's; the running buffers, when given in training mode, are updated once per
forward under any checkpoint (:func:`ckbn.checkpoint` replays the recorded batch statistics) and
never by a call that raises.
"""

from __future__ import annotations

import numbers
from typing import Optional

from torch import Tensor

from . import policy


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization over dimension 1 of ``input``, as :func:`torch.nn.functional.batch_norm`.

    With ``training``, the batch statistics normalize and ``running_mean`` / ``running_var`` (both
    or neither) are updated in place with ``momentum``; otherwise they normalize.
    """
    if not isinstance(momentum, numbers.Real):  # torch's argument parser; momentum=None is the modules' own
        raise TypeError(f"batch_norm(): argument 'momentum' (position 7) must be float, not {type(momentum).__name__}")
    return policy.run_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


__all__ = ["batch_norm"]
