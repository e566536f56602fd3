"""ckbn.SyncBatchNorm: across processes (gloo on 127.0.0.1) against torch's BatchNorm on the whole batch.

The multi-process tests run this file as a script in each rank (``python test_distributed.py RANK
WORLD_SIZE PORT SCENARIO[:ARGUMENT]...``), once per world size for all of its scenarios, under a hard
timeout so that a hang fails instead of blocking CI. The ranks inherit CKBN_BACKEND, so they test the
backend the parent tests.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist

import ckbn
import ckbn.distributed

TIMEOUT_S = 120
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)  # a rank left alone in a collective errors out
TOL = dict(rtol=1e-10, atol=1e-10)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


# --- the parent: launch ranks, bound them in time ------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(directory, world_size: int, scenarios) -> list:
    """Runs ``scenarios`` in order in ``world_size`` processes, within TIMEOUT_S; returns each rank's output."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(ckbn.__file__)))
    tests_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the shared helpers
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, tests_root, env.get("PYTHONPATH")]))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = str(_free_port())
    logs = [directory / f"rank{rank}.log" for rank in range(world_size)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:
            command = [sys.executable, os.path.abspath(__file__), str(rank), str(world_size), port, *scenarios]
            procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    outputs = []
    for proc, log in zip(procs, logs):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            outputs.append(log.read_text() + f"\n[killed after {TIMEOUT_S}s]")
        else:
            outputs.append(log.read_text() + f"\n[exit {proc.returncode}]")
    return outputs


def _assert_passed(outputs, scenario: str) -> None:
    if all(f"PASSED {scenario}\n" in output for output in outputs):
        return
    report = "\n".join(f"--- rank {rank} ---\n{output[-4000:]}" for rank, output in enumerate(outputs))
    pytest.fail(f"{scenario} did not pass on every rank\n{report}")


# --- the ranks ------------------------------------------------------------------------------------


def _slice(rank: int, batches):
    start = sum(batches[:rank])
    return slice(start, start + batches[rank])


def _randomize_affine(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and bn.affine:
                bn.weight.copy_(torch.rand(bn.num_features, generator=generator, dtype=bn.weight.dtype) + 0.5)
                bn.bias.copy_(torch.rand(bn.num_features, generator=generator, dtype=bn.bias.dtype) - 0.5)


def _assert_same_state(ours: torch.nn.Module, theirs: torch.nn.Module, **tol) -> None:
    expected = theirs.state_dict()
    assert list(ours.state_dict()) == list(expected)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key, **(tol or TOL))


def uneven_batches(rank: int, world_size: int, batches: str) -> None:
    """Outputs, grad_input, summed parameter gradients and running statistics over 3 steps against
    torch's BatchNorm on the concatenated batch, for C below and above the gather frame."""
    batches = [int(b) for b in batches.split(",")]
    mine = _slice(rank, batches)
    cases = [
        (torch.nn.BatchNorm2d, (3, 4, 5), dict(momentum=0.1)),
        (torch.nn.BatchNorm1d, (2050,), dict(momentum=None)),  # more channels than one gather frame
    ]
    for torch_cls, per_sample, config in cases:
        channels = per_sample[0]
        theirs = torch_cls(channels, dtype=torch.float64, **config)
        _randomize_affine(theirs, seed=1)
        ours = ckbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(theirs))
        generator = torch.Generator().manual_seed(2)
        for step in range(3):
            shape = (sum(batches), *per_sample)
            x = torch.randn(shape, generator=generator, dtype=torch.float64) * (step + 1) + step
            grad_out = torch.randn(shape, generator=generator, dtype=torch.float64)
            x_ours = x[mine].clone().requires_grad_()
            x_theirs = x.clone().requires_grad_()
            y_ours = ours(x_ours)
            y_ours.backward(grad_out[mine])
            y_theirs = theirs(x_theirs)
            y_theirs.backward(grad_out)
            torch.testing.assert_close(y_ours, y_theirs[mine], **TOL)
            torch.testing.assert_close(x_ours.grad, x_theirs.grad[mine], **TOL)
            param_grads = torch.cat([ours.weight.grad, ours.bias.grad])
            dist.all_reduce(param_grads)  # what DDP does, up to its 1/world_size
            torch.testing.assert_close(param_grads, torch.cat([theirs.weight.grad, theirs.bias.grad]), **TOL)
            ours.zero_grad()
            theirs.zero_grad()
            _assert_same_state(ours, theirs)
        _assert_same_on_every_rank(torch.cat([buffer.double().flatten() for buffer in ours.buffers()]))


def _assert_same_on_every_rank(tensor: torch.Tensor) -> None:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    assert all(torch.equal(other, tensor) for other in gathered), "ranks differ"


def low_precision(rank: int, world_size: int) -> None:
    """fp16/bf16 input with fp32 parameters (AMP) against fp64 on the whole batch; what travels is
    float32 statistics and sums, never half precision."""
    batches = [3, 5]
    mine = _slice(rank, batches)
    generator = torch.Generator().manual_seed(2)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        oracle = torch.nn.BatchNorm2d(3, dtype=torch.float64)
        _randomize_affine(oracle, seed=1)
        ours = ckbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(oracle)).float()
        x = (torch.randn(sum(batches), 3, 4, 5, generator=generator) * 2 + 1).to(dtype)
        grad_out = torch.randn(x.shape, generator=generator).to(dtype)
        x_ours, x_oracle = x[mine].clone().requires_grad_(), x.double().requires_grad_()
        gather_name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        with mock.patch.object(dist, gather_name, wraps=getattr(dist, gather_name)) as gather:
            with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as reduce:
                y = ours(x_ours)
                y.backward(grad_out[mine])
        assert [call.args[1].dtype for call in gather.call_args_list] == [torch.float32]
        assert [call.args[0].dtype for call in reduce.call_args_list] == [torch.float32]
        y_oracle = oracle(x_oracle)
        y_oracle.backward(grad_out.double())
        assert y.dtype == x_ours.grad.dtype == dtype
        torch.testing.assert_close(y.double(), y_oracle[mine], rtol=tol, atol=tol)
        torch.testing.assert_close(x_ours.grad.double(), x_oracle.grad[mine], rtol=tol, atol=tol)
        _assert_same_state(ours.double(), oracle, rtol=tol, atol=tol)


def large_count(rank: int, world_size: int) -> None:
    """A per-rank count beyond float32's exact integers still merges exactly (float32 statistics)."""
    counts = [2**24 + 3, 5]
    values = [1.0, 3.0]
    x = torch.full((counts[rank], 1), values[rank])
    mean, invstd, total = ckbn.distributed.global_batch_stats(x, 1e-5, dist.group.WORLD)
    n, n0, n1 = sum(counts), *counts
    assert total == n
    expected_mean = (n0 * values[0] + n1 * values[1]) / n
    torch.testing.assert_close(mean.double(), torch.tensor([expected_mean], dtype=torch.float64))
    expected_var = n0 * n1 * (values[1] - values[0]) ** 2 / n**2
    torch.testing.assert_close(invstd.double(), torch.tensor([(expected_var + 1e-5) ** -0.5], dtype=torch.float64))


def _gloo_collectives(run) -> dict:
    """The gloo collectives ``run()`` executes, by kind, as torch.profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    counts = {}
    for event in profile.events():
        if event.name.startswith("gloo:"):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def collective_counts(rank: int, world_size: int) -> None:
    """Collectives per training step, without checkpoint, under ckbn.checkpoint and under torch's;
    running statistics exact in all three; eval mode and a one-rank group run none."""
    batches = [3, 5]
    mine = _slice(rank, batches)
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3)]
    base = torch.nn.Sequential(*layers, torch.nn.BatchNorm2d(4)).double()
    _randomize_affine(base, seed=1)
    x = torch.randn(sum(batches), 3, 7, 7, dtype=torch.float64)
    modes = {
        "none": lambda net, x: net(x),
        "ckbn.checkpoint": lambda net, x: ckbn.checkpoint(net, x),
        "ckbn.checkpoint, save=compute": lambda net, x: ckbn.checkpoint(net, x, save="compute"),
        "torch checkpoint": lambda net, x: torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False),
    }
    reference = copy.deepcopy(base)
    for _ in range(2):
        reference(x).square().sum().backward()
    measured = {}
    for mode, forward in modes.items():
        net = ckbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
        steps = [_gloo_collectives(lambda: forward(net, x[mine]).square().sum().backward()) for _ in range(2)]
        assert steps[0] == steps[1], (mode, steps)
        measured[mode] = steps[0]
        _assert_same_state(net, reference)
        net.eval()
        measured[mode + ", eval"] = _gloo_collectives(lambda: forward(net, x[mine]))

    one_rank_groups = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
    alone = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    ours = ckbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(alone), process_group=one_rank_groups[rank])
    h = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    measured["one-rank group"] = _gloo_collectives(lambda: ours(h).sum().backward())
    alone(h)
    _assert_same_state(ours, alone)

    per_layer = {"gloo:all_gather": 2, "gloo:all_reduce": 2}  # two SyncBatchNorm layers
    assert measured["none"] == per_layer, measured
    assert measured["ckbn.checkpoint"] == per_layer, measured
    assert measured["ckbn.checkpoint, save=compute"] == per_layer, measured
    assert measured["torch checkpoint"] == {"gloo:all_gather": 4, "gloo:all_reduce": 2}, measured
    for mode in modes:
        assert measured[mode + ", eval"] == {}, measured
    assert measured["one-rank group"] == {}, measured
    print("COLLECTIVES PER STEP " + json.dumps(measured))


class CheckpointedNet(torch.nn.Module):
    """conv-BN-ReLU twice, the second block under ckbn.checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.block = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())

    checkpointed = True  # False: plain, for ckbn.apply_checkpointing to wrap the block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ckbn.checkpoint(self.block, self.stem(x)) if self.checkpointed else self.block(self.stem(x))


def ddp_training(rank: int, world_size: int, wrapping: str = "ckbn.checkpoint") -> None:
    """3 SGD steps under DDP with ckbn.SyncBatchNorm and ckbn.checkpoint (or, with ``apply``,
    ckbn.apply_checkpointing(save="compute") on the block) equal one process on the whole batch."""
    batches = [3, 5]
    mine = _slice(rank, batches)
    torch.manual_seed(0)
    base = CheckpointedNet().double()
    _randomize_affine(base, seed=1)
    single = ckbn.convert_model(copy.deepcopy(base))
    synced = ckbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
    if wrapping == "apply":
        synced.checkpointed = False
        assert ckbn.apply_checkpointing(synced, lambda m: m is synced.block, save="compute").wrapped == ["block"]
    ddp = torch.nn.parallel.DistributedDataParallel(synced)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (single, ddp)]
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(sum(batches), 3, 6, 6, generator=generator, dtype=torch.float64)
        target = torch.randn(sum(batches), 4, 4, 4, generator=generator, dtype=torch.float64)
        # DDP averages the ranks' gradients: the single process divides its loss by the world size.
        (single(x) * target).sum().div(world_size).backward()
        (ddp(x[mine]) * target[mine]).sum().backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    _assert_same_state(ddp.module, single, rtol=1e-9, atol=1e-9)


def errors(rank: int, world_size: int) -> None:
    """Clear errors on every rank, and a process group still in step afterwards."""

    def raises(error, match, run):
        try:
            run()
        except error as exc:
            assert match in str(exc), exc
        else:
            raise AssertionError(f"expected {error.__name__}: {match}")

    # Wrong dims, and torch's eps checks: refused before any collective and any state change.
    raises(ValueError, "expected at least 2D input", lambda: ckbn.SyncBatchNorm(3)(torch.randn(3)))
    for eps, mode in ((0.0, True), (-1.0, False)):
        bn = ckbn.SyncBatchNorm(3, eps=eps).train(mode)
        try:
            torch.nn.BatchNorm1d(3, eps=eps).train(mode)(torch.randn(4, 3))
        except ValueError as exc:
            torch_message = str(exc)  # its words for it in the installed torch
        raises(ValueError, torch_message, lambda: bn(torch.randn(4, 3)))
        assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_var, torch.ones(3))
    # Ranks that disagree on C, with C inside and beyond one gather frame: found after one collective.
    for channels in ([3, 4], [3, 2100]):
        bn = ckbn.SyncBatchNorm(channels[rank], affine=False, track_running_stats=False)
        raises(RuntimeError, "disagree on the number of channels", lambda: bn(torch.randn(2, channels[rank])))
    # One value per channel over the whole group, and per rank, which the group makes enough.
    bn = ckbn.SyncBatchNorm(3)
    raises(ValueError, "Expected more than 1 value per channel", lambda: bn(torch.randn(1 - rank, 3)))
    assert bn.num_batches_tracked.item() == 0
    x = torch.randn(1, 3, requires_grad=True)
    bn(x).sum().backward()
    assert bn.num_batches_tracked.item() == 1 and x.grad is not None


def recalibrate(rank: int, world_size: int, shards: str) -> None:
    """ckbn.recalibrate over each rank's shard of batches (uneven, one empty) equals the population
    statistics of all the batches in one process, on every rank, after one collective."""
    from recalibration_oracle import assert_matches_population, population_statistics, shifted_batches, small_model

    shards = [int(n) for n in shards.split(",")]
    batches = shifted_batches((3, 4, 4), [2, 5, 3, 1, 4][: sum(shards)])
    mine = batches[_slice(rank, shards)]
    model = small_model(2).double()
    expected = population_statistics(model, batches)
    collectives = _gloo_collectives(lambda: ckbn.recalibrate(model, mine))
    assert sum(collectives.values()) == 1, collectives
    assert_matches_population(model, expected, rtol=1e-12)
    assert model[0].num_batches_tracked.item() == sum(shards)


SCENARIOS = {
    f.__name__: f
    for f in (uneven_batches, low_precision, large_count, collective_counts, ddp_training, errors, recalibrate)
}


def _rank_main(rank: str, world_size: str, port: str, *scenarios: str) -> None:
    """Runs each ``NAME[:ARGUMENT]`` of ``scenarios`` in turn, printing PASSED for each; stops at the first failure."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=int(rank),
        world_size=int(world_size),
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        for scenario in scenarios:
            name, _, argument = scenario.partition(":")
            SCENARIOS[name](int(rank), int(world_size), *filter(None, [argument]))
            print(f"PASSED {scenario}", flush=True)
    finally:
        dist.destroy_process_group()


# --- the tests ------------------------------------------------------------------------------------

# One launch per world size runs all of its scenarios: every rank process spends seconds importing torch.
LAUNCHES = {
    2: [
        "collective_counts",
        "ddp_training",
        "ddp_training:apply",
        "uneven_batches:3,0",
        "low_precision",
        "large_count",
        "errors",
    ],
    3: ["uneven_batches:2,0,5", "recalibrate:2,0,3"],
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """ranks(world_size): the outputs of that world size's launch, run on first use."""
    outputs = {}

    def launch(world_size: int) -> list:
        if world_size not in outputs:
            directory = tmp_path_factory.mktemp(f"world{world_size}")
            outputs[world_size] = _run_ranks(directory, world_size, LAUNCHES[world_size])
        return outputs[world_size]

    return launch


@pytest.mark.parametrize("batches", ["3,0", "2,0,5"], ids=["2_ranks", "3_ranks"])
def test_uneven_batches_match_batchnorm_on_concatenated_batch(ranks, batches):
    _assert_passed(ranks(len(batches.split(","))), f"uneven_batches:{batches}")


def test_recalibrate_over_uneven_and_empty_shards(ranks):
    _assert_passed(ranks(3), "recalibrate:2,0,3")


def test_collectives_per_step(ranks):
    outputs = ranks(2)
    _assert_passed(outputs, "collective_counts")
    print(next(line for line in outputs[0].splitlines() if line.startswith("COLLECTIVES PER STEP")))


def test_half_precision_input_communicates_fp32_or_wider(ranks):
    _assert_passed(ranks(2), "low_precision")


def test_count_beyond_float32_integers(ranks):
    _assert_passed(ranks(2), "large_count")


@pytest.mark.parametrize("scenario", ["ddp_training", "ddp_training:apply"])
def test_ddp_with_checkpoint_matches_single_process(ranks, scenario):
    _assert_passed(ranks(2), scenario)


def test_errors_are_raised_on_every_rank(ranks):
    _assert_passed(ranks(2), "errors")


@pytest.mark.parametrize("config", [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)])
def test_without_process_group_it_is_batchnorm(config):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64, **config)
    _randomize_affine(theirs, seed=1)
    ours = ckbn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(theirs))
    for train in (True, True, False):
        ours.train(train)
        theirs.train(train)
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        grad_out = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        y_ours.backward(grad_out)
        y_theirs.backward(grad_out)
        torch.testing.assert_close(y_ours, y_theirs, **TOL)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, **TOL)
        for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p_ours.grad, p_theirs.grad, **TOL)
        _assert_same_state(ours, theirs)


def test_state_dict_is_torchs():
    ours = ckbn.SyncBatchNorm(5, momentum=0.3, eps=1e-3)
    for theirs in (torch.nn.SyncBatchNorm(5), torch.nn.BatchNorm2d(5)):
        assert list(ours.state_dict()) == list(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(torch.nn.BatchNorm3d(5).state_dict())
    assert ours.extra_repr() == torch.nn.SyncBatchNorm(5, momentum=0.3, eps=1e-3).extra_repr()


def test_convert_sync_batchnorm():
    sources = [
        torch.nn.BatchNorm1d(2),
        torch.nn.BatchNorm2d(3, momentum=None),
        torch.nn.BatchNorm3d(4, affine=False),
        torch.nn.SyncBatchNorm(5, eps=1e-3),
        ckbn.BatchNorm1d(6),
        ckbn.BatchNorm2d(7, track_running_stats=False),
        ckbn.BatchNorm3d(8),
    ]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Sequential(*sources)).eval()
    group = object()  # stands for a process group: conversion only stores it
    converted = ckbn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model and type(model[0]) is torch.nn.Conv2d
    for source, bn in zip(sources, model[1]):
        assert type(bn) is ckbn.SyncBatchNorm and bn.process_group is group and not bn.training
        for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(bn, attribute) == getattr(source, attribute)
        theirs = source.state_dict(keep_vars=True)
        for name, ours in bn.state_dict(keep_vars=True).items():
            assert ours is theirs[name], name  # shared, not copied
    root = ckbn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))
    assert type(root) is ckbn.SyncBatchNorm and root.process_group is None


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])
