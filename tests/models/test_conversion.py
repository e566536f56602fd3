"""ckbn.convert_model's rules for the BatchNorm subclasses real models hold, its report, strict mode,
and the same rules in ckbn.fuse and ckbn.frozen_running_stats.

Each converted layer is held to the layer it replaced in float64: the same output and state_dict
keys, the same tensors (shared), and one count per checkpointed batch.
"""

import copy
import inspect
import logging
import pickle

import pytest
import torch
from torch import nn

import ckbn
from ckbn.conversion import BatchNormDropAct2d, SyncBatchNormDropAct


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


class PlainSubclass(nn.BatchNorm2d):
    """A subclass with torch's forward (an extra method and input check), as many codebases write."""

    def describe(self):
        return f"bn({self.num_features})"


class OwnForward(nn.BatchNorm2d):
    """A subclass with its own forward, as detectron2's NaiveSyncBatchNorm: ckbn must leave it."""

    def forward(self, input):
        return super().forward(input) * 1.0


def x64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def checkpointed_steps(layer, steps=3, shape=(4, 3, 5, 5)):
    for step in range(steps):
        x = x64(*shape, seed=step).requires_grad_()
        torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()


def assert_same_layer(converted, original, shape=(4, 3, 5, 5), shared=True):
    """``converted`` computes ``original``'s output, in training and eval, with its keys (and its
    tensors, when ``shared``)."""
    assert converted.state_dict().keys() == original.state_dict().keys()
    assert not shared or all(
        a is b
        for a, b in zip(converted.state_dict(keep_vars=True).values(), original.state_dict(keep_vars=True).values())
    )
    reference = copy.deepcopy(original)  # trained separately: converted shares original's tensors
    ours = copy.deepcopy(converted)
    for training in (True, False):
        reference.train(training)
        ours.train(training)
        torch.manual_seed(0)  # the same dropout mask
        expected = reference(x64(*shape, seed=5))
        torch.manual_seed(0)
        torch.testing.assert_close(ours(x64(*shape, seed=5)), expected, rtol=1e-12, atol=1e-12)


def timm_norm_act(timm, **kwargs):
    layer = timm.layers.BatchNormAct2d(3, **kwargs).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


@pytest.mark.parametrize(
    "kwargs, expected_class, activation",
    [
        (dict(act_layer=nn.SiLU), ckbn.BatchNormAct2d, "silu"),
        (dict(act_layer=nn.ReLU, inplace=True), ckbn.BatchNormAct2d, "relu"),
        (dict(apply_act=False), ckbn.BatchNormAct2d, "identity"),
        (dict(act_layer=nn.GELU), BatchNormDropAct2d, None),
        (dict(act_layer=nn.PReLU), BatchNormDropAct2d, None),  # the activation has a weight: act.weight
        (dict(act_layer=nn.ReLU, drop_layer=nn.Dropout), BatchNormDropAct2d, None),
    ],
)
def test_timm_batch_norm_act_converts_whatever_its_activation_and_drop(timm, kwargs, expected_class, activation):
    original = timm_norm_act(timm, **kwargs)
    converted, report = ckbn.convert_model(original, return_report=True)
    assert type(converted) is expected_class
    if activation is not None:
        assert converted.activation == activation
    else:
        assert converted.act is original.act and converted.drop is original.drop
    assert list(report.converted) == ["(the model itself)"] and not report.left
    assert_same_layer(converted, original)
    checkpointed_steps(converted)
    assert converted.num_batches_tracked.item() == 3


def test_timm_sync_batch_norm_act_converts_with_its_process_group(timm):
    group = object()  # the converted layer keeps it, unused without an initialised process group
    original = timm.layers.convert_sync_batchnorm(
        nn.Sequential(timm_norm_act(timm, act_layer=nn.GELU)), process_group=group
    )[0]
    assert type(original) is timm.layers.SyncBatchNormAct
    converted = ckbn.convert_model(original)
    assert type(converted) is SyncBatchNormDropAct and converted.process_group is group
    assert isinstance(converted, ckbn.SyncBatchNorm) and converted.act is original.act
    assert_same_layer(converted, original)


def test_torch_sync_batch_norm_converts_with_its_process_group():
    group = object()
    original = nn.SyncBatchNorm(3, momentum=None, process_group=group).double()
    converted = ckbn.convert_model(original)
    assert type(converted) is ckbn.SyncBatchNorm and converted.process_group is group
    assert converted.momentum is None
    assert_same_layer(converted, original)


def test_subclass_with_torch_forward_converts_in_place(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), PlainSubclass(3)).double()
    layer = model[1]
    truth = copy.deepcopy(model)
    converted, report = ckbn.convert_model(model, return_report=True)
    assert converted[1] is layer and type(layer) is PlainSubclass and layer.describe() == "bn(3)"
    assert "in place" in report.converted["1"]
    assert_same_layer(converted, truth, shared=False)
    checkpointed_steps(converted)
    assert layer.num_batches_tracked.item() == 3
    with ckbn.frozen_running_stats(converted):
        converted(x64(4, 3, 5, 5))
    assert layer.num_batches_tracked.item() == 3
    for copied in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        checkpointed_steps(copied)
        assert copied[1].num_batches_tracked.item() == 6 and copied[1].forward.module is copied[1]
    with pytest.raises(ValueError, match="expected 4D input"):  # its class's input check still runs
        layer(x64(4, 3))


def test_subclass_with_its_own_forward_is_left_named_and_warned(caplog):
    model = nn.Sequential(nn.BatchNorm2d(3), OwnForward(3), nn.BatchNorm2d(3, track_running_stats=False))
    with caplog.at_level(logging.WARNING, logger="ckbn.conversion"):
        converted, report = ckbn.convert_model(model, return_report=True)
    assert type(converted[0]) is ckbn.BatchNorm2d and type(converted[1]) is OwnForward
    assert "test_conversion.OwnForward has a forward of its own" in report.left["1"]
    assert report.counts_twice == ["1"]
    assert "1: " in caplog.text and "count a checkpointed batch twice" in caplog.text
    assert type(converted[2]) is ckbn.BatchNorm2d  # torch's class converts whatever its flags

    # the other tools say the same
    _, fuse_report = ckbn.fuse(converted, return_report=True)
    assert fuse_report.left["1"] == report.left["1"]
    with pytest.raises(TypeError, match="1 is a OwnForward.*ckbn cannot convert it: .*forward of its own"):
        with ckbn.frozen_running_stats(converted):
            pass


def test_strict_refuses_and_changes_nothing():
    model = nn.Sequential(nn.BatchNorm2d(3), OwnForward(3))
    with pytest.raises(TypeError, match=r"strict=True.*1: .*OwnForward has a forward of its own"):
        ckbn.convert_model(model, strict=True)
    assert type(model[0]) is nn.BatchNorm2d


def test_layers_without_running_statistics_are_left_without_a_warning(caplog, timm):
    torchvision = pytest.importorskip("torchvision")

    class NoStatistics(OwnForward):
        pass

    model = nn.Sequential(
        torchvision.ops.FrozenBatchNorm2d(3),
        timm.layers.FrozenBatchNormAct2d(3),
        NoStatistics(3, track_running_stats=False),
    )
    with caplog.at_level(logging.WARNING, logger="ckbn.conversion"):
        converted, report = ckbn.convert_model(model, return_report=True, strict=True)
    assert [type(m) for m in converted] == [type(m) for m in model]
    assert set(report.left) == {"0", "1", "2"} and not report.counts_twice and not caplog.text
    with ckbn.frozen_running_stats(converted):  # nothing to freeze, nothing refused
        pass


def test_report_of_timm_efficientnet(timm):
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    converted, report = ckbn.convert_model(model, return_report=True, strict=True)
    assert set(report.converted) == norms and not report.left
    assert not any(isinstance(m, timm.layers.BatchNormAct2d) for m in converted.modules())
    assert str(report).startswith(f"ckbn.convert_model: {len(norms)} layers converted, 0 left")


@pytest.mark.parametrize("materialised", [False, True], ids=["unmaterialised", "materialised"])
def test_convert_model_converts_torch_lazy_modules(materialised):
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.LazyBatchNorm2d(momentum=0.3))

    model, reference = build(), build()
    x = torch.randn(4, 2, 3, 3)
    if materialised:
        for m in (model, reference):
            m(x)  # torch's lazy module is now a torch.nn.BatchNorm2d
    weight = model[1].weight
    converted = ckbn.convert_model(model)
    assert converted is model and model[1].weight is weight  # shared, uninitialised or not
    assert type(model[1]) is (ckbn.BatchNorm2d if materialised else ckbn.LazyBatchNorm2d)
    torch.testing.assert_close(model(x), reference(x))
    assert type(model[1]) is ckbn.BatchNorm2d and model[1].weight is weight
    torch.testing.assert_close(model.state_dict(), reference.state_dict())


@pytest.mark.skipif(
    "bias" not in inspect.signature(torch.nn.BatchNorm2d).parameters, reason="this torch has no bias=False"
)
def test_convert_model_keeps_a_missing_bias():
    bn = torch.nn.BatchNorm2d(3, bias=False)
    converted = ckbn.convert_model(bn)
    assert converted.bias is None and list(converted.state_dict()) == list(bn.state_dict())
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(converted(x), torch.nn.BatchNorm2d(3, bias=False)(x))
