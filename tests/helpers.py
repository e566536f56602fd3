"""Helpers shared by several test files (tests/ is on sys.path under pytest)."""

import functools

from ckbn._backend import ops


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
