"""Helpers shared by several test files (tests/ is on sys.path under pytest: pyproject's pythonpath)."""

import functools
from pathlib import Path

import torch

from ckbn import ops

REPO_ROOT = Path(__file__).resolve().parents[1]


def counting(monkeypatch, name):
    """The list that every later call of the ckbn operator ``name`` appends its name to."""
    calls = []
    op = getattr(ops, name)

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        calls.append(name)
        return op(*args, **kwargs)

    monkeypatch.setattr(ops, name, wrapper)
    return calls


def raised(call):
    """The exception ``call()`` raises, or None: for comparing ckbn's exceptions with torch's."""
    try:
        call()
    except Exception as error:  # noqa: BLE001  (the exception itself is what is compared)
        return error
    return None


def tensors_of(output):
    """The tensors of a model's output, in order: a tensor, or lists, tuples and dicts of them."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output
    return [t for value in values for t in tensors_of(value)]
