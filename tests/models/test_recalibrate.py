"""ckbn.recalibrate against an oracle: every layer's input captured in float64 over the same batches,
concatenated, and its mean and unbiased variance taken by torch; and against
torch.optim.swa_utils.update_bn, which averages batch variances and misses the spread of the batch
means. The oracle is tests/recalibration_oracle.py; the distributed case (3 gloo ranks, uneven and
empty shards) is in modules/test_distributed.py.
"""

import copy

import pytest
import torch
from recalibration_oracle import (
    assert_matches_population,
    batch_norm_layers,
    population_statistics,
    shifted_batches,
    small_model,
)
from torch import nn

import ckbn


@pytest.mark.parametrize(
    "dim, spatial, memory_format",
    [(1, (5,), "contiguous"), (2, (4, 3), "contiguous"), (2, (4, 3), "channels_last"), (3, (2, 3, 2), "contiguous")],
)
def test_equals_population_statistics_in_float64(dim, spatial, memory_format):
    model = small_model(dim).double()
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    batches = shifted_batches((3, *spatial), [2, 5, 3, 1], memory_format=fmt)
    expected = population_statistics(model, batches)
    ckbn.recalibrate(model, batches)
    assert_matches_population(model, expected, rtol=1e-12)
    assert all(layer.num_batches_tracked.item() == 4 for layer in batch_norm_layers(model).values())


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-6)])
def test_low_precision_input_accumulates_in_float64(dtype, rtol):
    """The values a layer saw are exact in float64; only the float32 buffers round."""
    torch.manual_seed(0)
    model = nn.Sequential(
        ckbn.BatchNorm2d(3), ckbn.BatchNormAct2d(3, "relu"), ckbn.BatchNorm2d(3)
    )  # float32 parameters (AMP)
    batches = shifted_batches((3, 6, 6), [4, 7, 2], dtype=dtype)
    expected = population_statistics(model, batches)
    ckbn.recalibrate(model, batches)
    assert model[0].running_mean.dtype == torch.float32
    assert_matches_population(model, expected, rtol=rtol)


def test_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = ckbn.convert_model(torchvision.models.resnet18(num_classes=10))
    batches = shifted_batches((3, 32, 32), [3, 2, 4], dtype=torch.float32)
    expected = population_statistics(model, batches)
    ckbn.recalibrate(model, batches)
    assert_matches_population(model, expected, rtol=2e-6)


def test_update_bn_misses_the_spread_of_batch_means():
    model = small_model(2).double()
    batches = shifted_batches((3, 4, 4), [4, 4, 4, 4])
    expected = population_statistics(model, batches)
    theirs = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, theirs)
    ckbn.recalibrate(model, batches)
    assert_matches_population(model, expected, rtol=1e-12)
    first_var = expected["0"][1]
    relative = ((theirs[0].running_var.double() - first_var).abs() / first_var).max().item()
    assert relative > 0.1, relative  # update_bn's mean of batch variances is far from the data's


def test_changes_nothing_else_and_restores_the_rng():
    model = nn.Sequential(small_model(2), nn.Dropout(0.5)).double()
    model[0][1].eval()  # a submodule's own flag
    model.register_buffer("steps", torch.tensor(7))
    parameters = {k: v.clone() for k, v in model.named_parameters()}
    momenta = {name: m.momentum for name, m in batch_norm_layers(model).items()}
    flags = {name: m.training for name, m in model.named_modules()}
    batches = shifted_batches((3, 4, 4), [2, 3])
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    ckbn.recalibrate(model, batches)
    torch.testing.assert_close(torch.rand(3), expected_draw)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: m.momentum for name, m in batch_norm_layers(model).items()} == momenta
    assert all(torch.equal(v, parameters[k]) for k, v in model.named_parameters())
    assert model.steps.item() == 7


def test_a_failure_half_way_changes_no_buffer():
    model = small_model(2).double()
    before = copy.deepcopy(model.state_dict())

    def batches():
        yield from shifted_batches((3, 4, 4), [2, 3])
        raise RuntimeError("the loader broke")

    with pytest.raises(RuntimeError, match="the loader broke"):
        ckbn.recalibrate(model, batches())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_torch_batch_norm_is_refused_before_anything_runs():
    model = nn.Sequential(ckbn.BatchNorm2d(3), nn.BatchNorm2d(3))
    calls = []
    with pytest.raises(TypeError, match="1 is a BatchNorm2d.*ckbn.convert_model"):
        ckbn.recalibrate(model, [torch.randn(2, 3, 4, 4)], forward=lambda m, b: calls.append(b))
    assert not calls and model[0].num_batches_tracked.item() == 0


@pytest.mark.parametrize(
    "wrap", [lambda x: x, lambda x: (x, torch.zeros(len(x))), lambda x: [x, 0], lambda x: {"input": x}]
)
def test_batches_as_loaders_give_them(wrap):
    model = small_model(2).double()
    batches = shifted_batches((3, 4, 4), [2, 3, 4])
    expected = population_statistics(model, batches[:2])
    calls = []

    class Wrapped(nn.Module):  # takes `input` by keyword for the dict form
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input):
            calls.append(len(input))
            return self.inner(input)

    ckbn.recalibrate(Wrapped(), [wrap(b) for b in batches], num_batches=2)
    assert calls == [2, 3]
    assert_matches_population(model, expected, rtol=1e-12)
    assert model[0].num_batches_tracked.item() == 2


def test_custom_forward_and_progress(capsys):
    model = small_model(2).double()
    batches = shifted_batches((3, 4, 4), [2, 3])
    expected = population_statistics(model, batches)
    ckbn.recalibrate(model, [{"pixels": b} for b in batches], forward=lambda m, b: m(b["pixels"]), progress=True)
    assert_matches_population(model, expected, rtol=1e-12)
    assert "ckbn.recalibrate" in capsys.readouterr().err


def test_lazy_and_frozen_layers():
    torch.manual_seed(0)
    model = nn.Sequential(ckbn.LazyBatchNorm2d(), ckbn.BatchNormAct2d(3, "relu")).double()
    batches = shifted_batches((3, 4, 4), [2, 3])
    with ckbn.frozen_running_stats(model):
        ckbn.recalibrate(model, batches)
    expected = population_statistics(model, batches)
    assert type(model[0]) is ckbn.BatchNorm2d
    assert_matches_population(model, expected, rtol=1e-12)


def test_sync_batch_norm_without_a_process_group():
    torch.manual_seed(0)
    model = ckbn.SyncBatchNorm.convert_sync_batchnorm(small_model(2)).double()
    assert any(isinstance(m, ckbn.SyncBatchNorm) for m in model.modules())
    batches = shifted_batches((3, 4, 4), [2, 3, 4])
    expected = population_statistics(model, batches)
    ckbn.recalibrate(model, batches)
    assert_matches_population(model, expected, rtol=1e-12)
