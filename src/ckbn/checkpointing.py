"""Checkpoint policy: when a BatchNorm forward is a recompute, and how recorded statistics replay.

Two mechanisms, both consulted by the modules before they touch their running buffers:

* **Recompute detection.** Activation checkpointing re-runs the forward during the backward pass.
  A training-mode forward that runs while the autograd engine is executing a backward is therefore
  a recompute and must not update running statistics. This is how torch's own checkpoint code tells
  the two apart; it covers ``torch.utils.checkpoint`` with ``use_reentrant=True`` and ``False``,
  ``checkpoint_sequential``, and torchvision's memory-efficient DenseNet.

  The one case it misreads: a training-mode forward deliberately run from inside a backward (for
  example from a backward hook). Wrap such code in :func:`update_running_stats_in_backward`.

* **Record and replay** (:func:`checkpoint`). The first forward records each BatchNorm call's batch
  (mean, invstd) in call order; the recompute replays them instead of computing statistics again.
  The recompute then runs no statistics pass (and no collective for SyncBatchNorm), and its outputs
  are bitwise equal to the first forward's.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Collection, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Stats = Tuple[Tensor, Tensor]

_state = threading.local()


def _current_graph_task_id() -> int:
    try:
        return torch._C._current_graph_task_id()
    except AttributeError:  # a torch without the private call: no recompute can be recognised
        return -1


def in_backward_pass() -> bool:
    """True while this thread runs inside the autograd engine's backward (where recomputes run)."""
    if getattr(_state, "force_update", 0):
        return False
    return _current_graph_task_id() != -1


@contextlib.contextmanager
def update_running_stats_in_backward() -> Iterator[None]:
    """Treat training-mode forwards inside a backward pass as real forwards, not recomputes.

    For the rare code that runs a BatchNorm forward from a backward hook and wants it to update
    the running statistics. Do not use it around checkpointed code.
    """
    _state.force_update = getattr(_state, "force_update", 0) + 1
    try:
        yield
    finally:
        _state.force_update -= 1


class _Record:
    """The statistics of one checkpointed region's first forward, in call order."""

    __slots__ = ("stats",)

    def __init__(self) -> None:
        self.stats: List[Stats] = []


class _Recording:
    """Context for the first forward: statistics computed inside are appended to the record."""

    def __init__(self, record: _Record) -> None:
        self.record = record

    def __enter__(self):
        self.record.stats.clear()  # a region run twice records its latest forward only
        _frames().append(self)
        return self

    def __exit__(self, *exc) -> None:
        _pop_frame(self)


class _Replaying:
    """Context for a recompute: statistics come from the record, in order, instead of the data."""

    def __init__(self, record: _Record) -> None:
        self.record = record
        self.cursor = 0

    def __enter__(self):
        self.cursor = 0  # each recompute (e.g. backward with retain_graph, twice) starts over
        _frames().append(self)
        return self

    def __exit__(self, *exc) -> None:
        _pop_frame(self)

    def next_stats(self, channels: int, device: torch.device) -> Stats:
        if self.cursor >= len(self.record.stats):
            raise RuntimeError(
                "ckbn.checkpoint: the recompute ran more BatchNorm calls in training mode than the "
                f"forward did ({len(self.record.stats)}). The checkpointed function must run the same "
                "BatchNorm layers, in the same order, each time it is called."
            )
        mean, invstd = self.record.stats[self.cursor]
        if mean.numel() != channels or mean.device != device:
            raise RuntimeError(
                f"ckbn.checkpoint: BatchNorm call {self.cursor} of the recompute has {channels} channels on "
                f"{device}, but the forward recorded {mean.numel()} on {mean.device}. The checkpointed "
                "function must run the same BatchNorm layers, in the same order, each time it is called."
            )
        self.cursor += 1
        return mean, invstd


def _frames() -> list:
    frames = getattr(_state, "frames", None)
    if frames is None:
        frames = _state.frames = []
    return frames


def _pop_frame(frame) -> None:
    frames = _frames()
    # Frames normally close in LIFO order; an exception unwinding several at once is tolerated.
    if frame in frames:
        del frames[frames.index(frame) :]


def resolve_batch_stats(compute: Callable[[], Stats], channels: int, device: torch.device) -> Tuple[Stats, bool]:
    """The batch statistics of one training-mode BatchNorm call, and whether they were replayed.

    The innermost replaying checkpoint supplies them if there is one; otherwise ``compute()`` does.
    Every recording checkpoint opened above that point (nested checkpoints inside the replayed
    region) records them, so that it can replay them in its own recompute.
    """
    frames = getattr(_state, "frames", None)
    if not frames:
        return compute(), False
    replay_at = None
    for i in range(len(frames) - 1, -1, -1):
        if isinstance(frames[i], _Replaying):
            replay_at = i
            break
    if replay_at is None:
        stats = compute()
    else:
        stats = frames[replay_at].next_stats(channels, device)
    for frame in frames[replay_at + 1 if replay_at is not None else 0 :]:
        frame.record.stats.append(stats)
    return stats, replay_at is not None


def _record_replay_contexts() -> Tuple[_Recording, _Replaying]:
    record = _Record()
    return _Recording(record), _Replaying(record)


def _ops(*names: str) -> frozenset:
    """The default overloads of the aten ops ``names`` that this torch has."""
    found = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        overload = getattr(packet, "default", None) if packet is not None else None
        if overload is not None:
            found.add(overload)
    return frozenset(found)


# What `save` takes: None (recompute everything), "compute" (COMPUTE_INTENSIVE_OPS below), a
# collection of ops to keep, or a policy callable as torch.utils.checkpoint takes it.
SavePolicy = Optional[Union[str, Collection[Any], Callable[..., Any]]]

# save="compute": ops whose outputs cost more to recompute than to keep. BatchNorm, activations,
# adds, concatenations and pooling hold most of a CNN's activation memory for a few percent of its
# FLOPs: those are recomputed.
COMPUTE_INTENSIVE_OPS = _ops(
    "convolution",
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "linear",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


def _selective_policy(save: SavePolicy):
    """torch's selective-checkpoint policy (a list of ops or a callable) for ``save``, or None."""
    if save is None:
        return None
    if isinstance(save, str):
        if save != "compute":
            raise ValueError(
                f"ckbn.checkpoint: save must be None, 'compute', a set of ops or a policy callable, not {save!r}"
            )
        return sorted(COMPUTE_INTENSIVE_OPS, key=str)
    if callable(save):
        return save
    try:
        return list(save)
    except TypeError:
        raise TypeError(
            f"ckbn.checkpoint: save must be None, 'compute', a set of ops or a policy callable, not {save!r}"
        ) from None


class _Both:
    """Two context managers entered as one (checkpoint's context_fn returns one per phase)."""

    def __init__(self, first, second) -> None:
        self.contexts = (first, second)
        self.stack = None

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        for context in self.contexts:
            self.stack.enter_context(context)
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _contexts(policy) -> Callable[[], tuple]:
    if policy is None:
        return _record_replay_contexts

    def record_replay_and_select():
        recording, replaying = _record_replay_contexts()
        forward, recompute = torch.utils.checkpoint.create_selective_checkpoint_contexts(policy)
        return _Both(recording, forward), _Both(replaying, recompute)

    return record_replay_and_select


def checkpoint(function: Callable, *args: Any, save: SavePolicy = None, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint`` that replays BatchNorm statistics in the recompute.

    Runs ``function(*args, **kwargs)`` under torch's non-reentrant checkpoint. The forward records
    the batch statistics of every ckbn BatchNorm call; the recompute during backward replays them, so
    it skips the statistics pass (and SyncBatchNorm's collective), leaves running buffers alone and
    reproduces the forward's outputs bit for bit. Keyword arguments other than ``context_fn`` are
    passed to torch's checkpoint (``preserve_rng_state``, ``determinism_check``, ``debug``).

    ``save`` chooses what the forward keeps (torch's selective checkpointing): None recomputes
    everything; ``"compute"`` keeps the outputs of :data:`COMPUTE_INTENSIVE_OPS` (convolutions,
    matrix products, attention) and recomputes the rest; a set or list of ops keeps those; a
    callable is a policy as :func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`
    takes it. BatchNorm statistics replay under every policy.

    The checkpointed function must call the same BatchNorm layers in the same order every time.

    Under ``torch.compile`` the record/replay is not traced: the compiler decides what to recompute
    (with ``save``'s policy, under torch's rules for selective checkpointing), and ckbn falls back to
    non-reentrant checkpointing, whose running statistics are still updated exactly once.
    """
    if "context_fn" in kwargs:
        raise TypeError("ckbn.checkpoint: context_fn is ckbn's own; use torch.utils.checkpoint for a custom one")
    if kwargs.pop("use_reentrant", False):
        raise ValueError("ckbn.checkpoint: use_reentrant=True cannot replay statistics; it is always non-reentrant")
    policy = _selective_policy(save)
    checkpoint_kwargs = {
        key: kwargs.pop(key) for key in ("preserve_rng_state", "determinism_check", "debug") if key in kwargs
    }
    if torch.compiler.is_compiling():
        if policy is not None:
            checkpoint_kwargs["context_fn"] = functools.partial(
                torch.utils.checkpoint.create_selective_checkpoint_contexts, policy
            )
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **checkpoint_kwargs, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        function,
        *args,
        use_reentrant=False,
        context_fn=_contexts(policy),
        **checkpoint_kwargs,
        **kwargs,
    )


def checkpoint_sequential(
    functions: Sequence[Callable] | torch.nn.Sequential,
    segments: int,
    input: Tensor,
    **kwargs: Any,
) -> Tensor:
    """``torch.utils.checkpoint.checkpoint_sequential`` built on :func:`checkpoint`.

    Splits ``functions`` into ``segments`` segments exactly as torch does, but checkpoints every
    segment, the last one included, each with statistics replay. Keyword arguments, ``save``
    included, go to :func:`checkpoint`.
    """
    if isinstance(functions, torch.nn.Sequential):
        functions = list(functions.children())
    functions = list(functions)
    if segments < 1:
        raise ValueError(f"ckbn.checkpoint_sequential: segments must be at least 1, not {segments}")

    def run_segment(start: int, end: int) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            for j in range(start, end + 1):
                x = functions[j](x)
            return x

        return forward

    segment_size = len(functions) // segments
    end = -1
    # The same segmentation as torch's: segments - 1 segments of len // segments functions, and a
    # last segment with the rest.
    for start in range(0, segment_size * (segments - 1), segment_size):
        end = start + segment_size - 1
        input = checkpoint(run_segment(start, end), input, **kwargs)
    if end + 1 <= len(functions) - 1:
        input = checkpoint(run_segment(end + 1, len(functions) - 1), input, **kwargs)
    return input


__all__ = [
    "COMPUTE_INTENSIVE_OPS",
    "checkpoint",
    "checkpoint_sequential",
    "in_backward_pass",
    "update_running_stats_in_backward",
]
