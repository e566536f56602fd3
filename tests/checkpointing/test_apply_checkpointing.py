"""ckbn.apply_checkpointing on the model zoos: the blocks it picks, unchanged state_dict keys, a
checkpointed training step equal to the unchecked one (float64) with statistics counted once, no
recompute in eval or under no_grad, and a model that still deep-copies and pickles.
"""

import copy
import pickle

import pytest
import torch
from helpers import tensors_of

import ckbn
import ckbn.block_checkpointing


def torchvision_model(name):
    torchvision = pytest.importorskip("torchvision")
    return lambda: getattr(torchvision.models, name)(num_classes=10)


def timm_model(name):
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model(name, pretrained=False, num_classes=10)


def yolov8n():
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", verbose=False)


# name -> (builder, the blocks picked by default, input shape)
MODELS = {
    "resnet50": (lambda: torchvision_model("resnet50")(), {"Bottleneck": 16}, (2, 3, 32, 32)),
    "densenet121": (lambda: torchvision_model("densenet121")(), {"_DenseLayer": 58}, (2, 3, 32, 32)),
    "mobilenet_v3_large": (lambda: torchvision_model("mobilenet_v3_large")(), {"InvertedResidual": 15}, (2, 3, 32, 32)),
    "timm efficientnet_b0": (
        lambda: timm_model("efficientnet_b0")(),
        {"DepthwiseSeparableConv": 1, "InvertedResidual": 15},
        (2, 3, 32, 32),
    ),
    "yolov8n": (yolov8n, {"C2f": 8, "SPPF": 1}, (2, 3, 64, 64)),
}


def step(model, x):
    torch.manual_seed(0)  # the same dropout masks in every model
    outputs = tensors_of(model(x))
    sum((o * o).mean() for o in outputs).backward()
    return [o.detach() for o in outputs]


@pytest.fixture
def checkpoint_calls(monkeypatch):
    calls = []
    inner = ckbn.block_checkpointing.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("save"))
        return inner(*args, **kwargs)

    monkeypatch.setattr(ckbn.block_checkpointing, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "densenet121" else n for n in MODELS])
def test_zoo_models(name, checkpoint_calls, monkeypatch, tmp_path):
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    build, expected_blocks, shape = MODELS[name]
    torch.manual_seed(0)
    unchecked = ckbn.convert_model(build().double())
    model = copy.deepcopy(unchecked)
    keys = list(model.state_dict())
    report = ckbn.apply_checkpointing(model, save="compute")
    assert {cls: report.classes.count(cls) for cls in report.classes} == expected_blocks
    assert list(model.state_dict()) == keys

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for y, y_unchecked in zip(step(model, x), step(unchecked, x)):
        torch.testing.assert_close(y, y_unchecked, rtol=1e-12, atol=1e-12)
    assert checkpoint_calls == ["compute"] * len(report.wrapped)
    for (key, p), p_unchecked in zip(model.named_parameters(), unchecked.parameters()):
        torch.testing.assert_close(p.grad, p_unchecked.grad, rtol=1e-10, atol=1e-12, msg=key)
    for (key, b), b_unchecked in zip(model.state_dict().items(), unchecked.state_dict().values()):
        torch.testing.assert_close(b, b_unchecked, rtol=1e-12, atol=1e-12, msg=key)

    checkpoint_calls.clear()
    model.eval()
    model(x)  # eval: no recompute
    model.train()
    with torch.no_grad():
        model(x)  # recalibration-style forward: no recompute either
    assert checkpoint_calls == []


def test_copies_stay_checkpointed_and_wrapping_twice_does_nothing(checkpoint_calls):
    torchvision = pytest.importorskip("torchvision")
    model = ckbn.convert_model(torchvision.models.resnet18(num_classes=10))
    assert len(ckbn.apply_checkpointing(model).wrapped) == 8
    assert ckbn.apply_checkpointing(model).wrapped == []
    x = torch.randn(2, 3, 32, 32)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        checkpoint_calls.clear()
        step(copied, x)
        assert len(checkpoint_calls) == 8
        assert copied.layer1[0].forward.module is copied.layer1[0]
        assert copied.layer1[0].bn1.num_batches_tracked.item() == 1


def test_fused_forwards_are_kept_and_check_fn_picks(checkpoint_calls):
    torchvision = pytest.importorskip("torchvision")
    model = ckbn.convert_model(torchvision.models.resnet18(num_classes=10), fuse_activations=True)
    unchecked, stages = copy.deepcopy(model), copy.deepcopy(model)
    assert len(ckbn.apply_checkpointing(model).wrapped) == 8  # BasicBlocks whose forward ckbn.fuse rewrote
    x = torch.randn(2, 3, 32, 32, dtype=torch.float32)
    torch.testing.assert_close(step(model, x)[0], step(unchecked, x)[0], rtol=0, atol=0)
    assert len(checkpoint_calls) == 8
    report = ckbn.apply_checkpointing(stages, lambda m: isinstance(m, torch.nn.Sequential))
    assert report.wrapped == ["layer1", "layer2", "layer3", "layer4"]


def test_composes_with_frozen_running_stats_and_sync_batch_norm(checkpoint_calls):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = ckbn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=10))
    unchecked = copy.deepcopy(model)
    ckbn.apply_checkpointing(model, save="compute")
    x = torch.randn(2, 3, 32, 32)
    with ckbn.frozen_running_stats(model):
        step(model, x)
    assert len(checkpoint_calls) == 8 and model.layer1[0].bn1.num_batches_tracked.item() == 0
    torch.testing.assert_close(step(model, x)[0], step(unchecked, x)[0], rtol=0, atol=0)
    assert model.layer1[0].bn1.num_batches_tracked.item() == 1
