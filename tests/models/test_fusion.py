"""Fused BatchNorm + activation modules and the automatic fusion of models (ckbn.fuse,
convert_model(fuse_activations=True)).

A fused module is held to torch's BatchNorm followed by torch's activation module, in float64, to a
relative 1e-10. A fused model is held to the same model unfused, in float64:

* in training mode, to the model with ckbn's BatchNorm and its own activations: one step gives the
  same outputs, gradients and running buffers (relative 1e-10). Against torch's BatchNorm, deep
  networks on small inputs amplify BatchNorm's last-bit differences far beyond 1e-10 (a BatchNorm
  over 2 values per channel is ill-conditioned): ckbn's unfused BatchNorm differs from torch's there
  by as much as the fused one does;
* in eval mode, to the original torch model holding the same state_dict (relative 1e-10).

Models are built without pretrained weights, from a fixed seed, and run on small inputs.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

import ckbn
from ckbn.activations import ACTIVATIONS

TOLERANCE = 1e-10
FUSED_TYPES = (ckbn.BatchNormAct1d, ckbn.BatchNormAct2d, ckbn.BatchNormAct3d)
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
FUSED_BN = {1: ckbn.BatchNormAct1d, 2: ckbn.BatchNormAct2d, 3: ckbn.BatchNormAct3d}
ACTIVATION_MODULES = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
}
SHAPES = {1: (4, 3, 5), 2: (4, 3, 5, 2), 3: (2, 3, 2, 3, 2)}


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-300)).item()


def training_step(model, x):
    """Outputs, parameter gradients and input gradient of one training step, each one flat vector."""
    x = x.clone().requires_grad_()
    torch.manual_seed(2)  # the same dropout and stochastic-depth draws in every model
    outputs = [y for y in tree_leaves(model(x)) if isinstance(y, torch.Tensor)]
    cotangents = [
        torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(i)) for i, y in enumerate(outputs)
    ]
    sum((y * c).sum() for y, c in zip(outputs, cotangents)).backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat([y.detach().flatten() for y in outputs]), torch.cat(grads), x.grad


def assert_same_step(unfused, fused, x):
    """One training step of each; outputs, gradients and every buffer agree."""
    for theirs, ours, what in zip(
        training_step(unfused, x), training_step(fused, x), ("output", "gradient", "input gradient")
    ):
        assert relative_error(ours, theirs) <= TOLERANCE, what
    theirs, ours = dict(unfused.named_buffers()), dict(fused.named_buffers())
    assert theirs.keys() == ours.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=TOLERANCE, atol=TOLERANCE, msg=name)


def assert_same_model(torch_model, unfused, fused, x, training=True):
    """A step of ``fused`` equals one of ``unfused`` (ckbn's BatchNorm); then, in eval mode, ``fused``
    equals ``torch_model`` given the same state_dict.

    ``training=False`` takes the step in eval mode, for SiLU networks whose last stages are 1x1 on
    these inputs: BatchNorms over 2 values per channel amplify the fused SiLU's last-bit differences
    from torch's about 100 times a block (efficientnet_b0 at 16x16: 1e-16 to 7e-2 over its features),
    which a larger input would avoid at many times the cost.
    """
    unfused.train(training), fused.train(training)
    assert_same_step(unfused, fused, x)
    torch_model.load_state_dict(fused.state_dict(), strict=True)
    torch_model.eval(), fused.eval()
    with torch.no_grad():
        for theirs, ours in zip(tree_leaves(torch_model(x)), tree_leaves(fused(x))):
            assert relative_error(ours, theirs) <= TOLERANCE, "eval output"


def fused_activations(model):
    return [m.activation for m in model.modules() if isinstance(m, FUSED_TYPES) and m.activation != "identity"]


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_module_equals_batch_norm_then_activation(dim, activation):
    torch.manual_seed(0)
    theirs = TORCH_BN[dim](3, dtype=torch.float64)
    nn.init.normal_(theirs.weight)
    nn.init.normal_(theirs.bias)
    ours = FUSED_BN[dim](3, activation, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    unfused = nn.Sequential(theirs, ACTIVATION_MODULES[activation]())
    x = torch.randn(SHAPES[dim], dtype=torch.float64)
    assert_same_step(unfused, nn.Sequential(ours, nn.Identity()), x)
    unfused.eval(), ours.eval()
    torch.testing.assert_close(ours(x), unfused(x), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("affine, track_running_stats", [(True, True), (False, False), (False, True)])
def test_state_dict_round_trip_with_torch_batch_norm(dim, affine, track_running_stats):
    kwargs = dict(affine=affine, track_running_stats=track_running_stats)
    theirs = TORCH_BN[dim](3, **kwargs)
    theirs(torch.randn(SHAPES[dim]) * 3 + 1)  # non-default buffers
    ours = FUSED_BN[dim](3, "leaky_relu", 0.2, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = TORCH_BN[dim](3, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    assert ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]


@pytest.mark.parametrize(
    "activation, param",
    [("gelu", None), ("ReLU", None), (None, None), ("leaky_relu", "0.1"), ("leaky_relu", True), ("relu", 0.5)],
)
def test_bad_activation_raises_at_construction(activation, param):
    with pytest.raises(ValueError, match="activation|slope"):
        ckbn.BatchNormAct2d(4, activation, param)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m: m(torch.randn(2, 3, 4)), ValueError),  # 3D input to a 2d module
        (lambda m: m(torch.randn(2, 5, 3, 3)), RuntimeError),  # wrong channel count
        (lambda m: m(torch.randn(1, 3, 1, 1)), ValueError),  # one value per channel in training
        (lambda m: m(torch.ones(2, 3, 2, 2, dtype=torch.int64)), RuntimeError),
    ],
)
def test_failing_forward_leaves_buffers_unchanged(call, error):
    module = ckbn.BatchNormAct2d(3, "silu")
    module(torch.randn(2, 3, 2, 2))
    before = {name: b.clone() for name, b in module.named_buffers()}
    with pytest.raises(error):
        call(module)
    for name, b in module.named_buffers():
        assert torch.equal(b, before[name]), name


def test_not_taken_for_a_plain_batch_norm():
    """Code that folds or converts BatchNorms by isinstance must not see the fused module as one."""
    fused = ckbn.BatchNormAct2d(3, "leaky_relu", 0.3)
    assert not isinstance(fused, nn.modules.batchnorm._BatchNorm)
    assert "activation=leaky_relu, activation_param=0.3" in repr(fused)
    model = nn.Sequential(fused)
    for convert in (
        nn.SyncBatchNorm.convert_sync_batchnorm,
        ckbn.convert_model,
        ckbn.SyncBatchNorm.convert_sync_batchnorm,
    ):
        assert convert(model)[0] is fused
    with pytest.raises(AttributeError):
        fused.activation = "relu"  # validated once, at construction


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_module_saves_only_its_input_full_size(activation):
    module = ckbn.BatchNormAct2d(3, activation)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x)
    full_size = [t for t in saved if t.numel() == x.numel()]
    assert len(full_size) == 1 and full_size[0].data_ptr() == x.data_ptr()
    assert all(t.numel() <= x.size(1) for t in saved if t.numel() != x.numel())


# ---------------------------------------------------------------- checkpoints


def conv_bn_act_block(batch_norm, activation):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), batch_norm(4), activation(), nn.Conv2d(4, 3, 1), batch_norm(3), nn.SiLU()
    )


CHECKPOINTS = {
    "ckbn.checkpoint": ckbn.checkpoint,
    "torch reentrant": lambda f, x: torch.utils.checkpoint.checkpoint(f, x, use_reentrant=True),
    "torch non-reentrant": lambda f, x: torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False),
}


@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS))
def test_running_statistics_exact_under_checkpoint(checkpoint):
    torch.manual_seed(0)
    unchecked = ckbn.fuse(conv_bn_act_block(nn.BatchNorm2d, nn.ReLU6).double())
    assert len(fused_activations(unchecked)) == 2
    checked = copy.deepcopy(unchecked)
    for step in range(3):
        x = torch.randn(
            2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step), requires_grad=True
        )
        unchecked(x).sum().backward()
        CHECKPOINTS[checkpoint](checked, x).sum().backward()
    for (name, theirs), ours in zip(unchecked.named_buffers(), checked.buffers()):
        torch.testing.assert_close(ours, theirs, rtol=TOLERANCE, atol=0, msg=name)
    assert [m.num_batches_tracked.item() for m in checked.modules() if isinstance(m, FUSED_TYPES)] == [3, 3]


# ---------------------------------------------------------------- fusion of small modules


class FunctionalActivations(nn.Module):
    """Activations as functions, methods and a module called twice; BatchNorms that must stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_leaky = nn.BatchNorm2d(4)
        self.bn_method = nn.BatchNorm2d(4)
        self.bn_shared_relu = nn.BatchNorm2d(4)
        self.bn_two_users = nn.BatchNorm2d(4)
        self.bn_residual = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)  # called twice: its module stays, each call is fused or not

    def forward(self, x):
        x = F.leaky_relu(self.bn_leaky(self.conv(x)), 0.2)
        x = self.bn_method(x).relu_()
        x = self.relu(self.bn_shared_relu(x))
        y = self.bn_two_users(x)
        x = torch.sigmoid(y) * F.relu(y)
        return self.relu(self.bn_residual(x) + x)


class TrainingDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.relu(self.bn(x)) if self.training else self.bn(x)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it; its Sequential child is fused all the same."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Hardswish(), nn.BatchNorm2d(3))

    def forward(self, x):
        x = F.relu(self.bn(x))
        return self.body(x) if x.sum() > 0 else -self.body(x)


@pytest.mark.parametrize(
    "model, fused, left",
    [
        (
            FunctionalActivations,
            {"bn_leaky": "leaky_relu(0.2)", "bn_method": "relu", "bn_shared_relu": "relu"},
            ["bn_two_users", "bn_residual"],
        ),
        (TrainingDependent, {}, ["bn"]),
        (Untraceable, {"body.1": "hardswish"}, ["bn", "body.3"]),
    ],
)
def test_fusion_of_small_modules(model, fused, left):
    torch.manual_seed(0)
    unfused = model().double()
    result, report = ckbn.fuse(copy.deepcopy(unfused), return_report=True)
    assert report.fused == fused
    assert sorted(report.left) == sorted(left)
    assert result.state_dict().keys() == unfused.state_dict().keys()
    assert_same_step(unfused, result, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    if model is Untraceable:
        assert type(result) is Untraceable and "cannot be traced" in report.left["bn"]


def test_fusion_shares_parameters_and_survives_copy_and_pickle(tmp_path):
    torch.manual_seed(0)
    unfused = FunctionalActivations().double()
    model = copy.deepcopy(unfused)
    weights = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    assert ckbn.fuse(model) is model and type(model) is FunctionalActivations
    assert all(p is weights[name] for name, p in model.named_parameters())
    assert all(b is buffers[name] for name, b in model.named_buffers())
    assert ckbn.fuse(model, return_report=True)[1].fused == {}  # a second pass finds nothing to do
    torch.save(model, tmp_path / "model.pt")
    for copied in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert type(copied) is FunctionalActivations and len(fused_activations(copied)) == 3
        assert_same_step(copy.deepcopy(unfused), copied, torch.randn(2, 3, 4, 4, dtype=torch.float64))


def test_convert_model_with_fuse_activations_converts_every_batch_norm():
    torch.manual_seed(0)
    model = FunctionalActivations().double()
    converted = ckbn.convert_model(copy.deepcopy(model), fuse_activations=True)
    norms = [m for m in converted.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, *FUSED_TYPES))]
    assert sorted(type(m).__name__ for m in norms) == ["BatchNorm2d"] * 2 + ["BatchNormAct2d"] * 3
    assert all(type(m) in (ckbn.BatchNorm2d, ckbn.BatchNormAct2d) for m in norms)
    assert_same_step(model, converted, torch.randn(2, 3, 4, 4, dtype=torch.float64))


# ---------------------------------------------------------------- real models

torchvision = pytest.importorskip("torchvision")

# The BatchNorms that no activation follows: ResNet's last in each block and in each downsample,
# the projections of inverted-residual blocks, DenseNet's norm5 (its ReLU is in DenseNet.forward).
TORCHVISION_UNFUSED = {
    "resnet50": 16 + 4,
    "mobilenet_v2": 17,
    "mobilenet_v3_large": 15,
    "efficientnet_b0": 16,
    "densenet121": 1,
}
EVAL_STEP = {"efficientnet_b0"}  # see assert_same_model


@pytest.mark.parametrize("name", list(TORCHVISION_UNFUSED))
def test_torchvision_model_fused(name):
    torch.manual_seed(0)
    unfused = getattr(torchvision.models, name)(weights=None, num_classes=10).double()
    batch_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in unfused.modules())
    model, report = ckbn.fuse(copy.deepcopy(unfused), return_report=True)
    model = ckbn.convert_model(model)
    assert len(report.left) == TORCHVISION_UNFUSED[name]
    assert len(report.fused) == len(fused_activations(model)) == batch_norms - TORCHVISION_UNFUSED[name]
    size = 32 if name == "densenet121" else 16  # DenseNet's pooling needs 32
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    assert_same_model(unfused, ckbn.convert_model(copy.deepcopy(unfused)), model, x, name not in EVAL_STEP)


def test_timm_batch_norm_act_converts_with_its_weights():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    unfused = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).double()
    timm_norms = [m for m in unfused.modules() if isinstance(m, timm.layers.BatchNormAct2d)]
    with_activation = [m for m in timm_norms if not isinstance(m.act, nn.Identity)]
    assert timm_norms and with_activation
    model, report = ckbn.fuse(copy.deepcopy(unfused), return_report=True)
    assert not any(isinstance(m, timm.layers.BatchNormAct2d) for m in model.modules())
    assert len(report.fused) == len(fused_activations(model)) == len(with_activation)
    # timm's modules, unfused, with ckbn's BatchNorm arithmetic
    reference = copy.deepcopy(unfused)
    for m in reference.modules():
        if isinstance(m, timm.layers.BatchNormAct2d):
            m.forward = lambda x, m=m: m.act(m.drop(ckbn.policy.batch_norm_forward(m, x)))
    assert_same_model(unfused, reference, model, torch.randn(2, 3, 16, 16, dtype=torch.float64), training=False)
    model.load_state_dict(unfused.state_dict(), strict=True)


def test_timm_batch_norm_act_with_dropout_is_refused():
    timm = pytest.importorskip("timm")
    norm = timm.layers.BatchNormAct2d(4, drop_layer=nn.Dropout)
    model, report = ckbn.fuse(nn.Sequential(norm), return_report=True)
    assert model[0] is norm and "drop=Dropout" in report.left["0"]


def test_ultralytics_yolov8n_fuses_every_conv(ultralytics):
    from ultralytics.nn.modules import Conv
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    unfused = DetectionModel("yolov8n.yaml", verbose=False).double()
    convs = sum(isinstance(m, Conv) for m in unfused.modules())
    model, report = ckbn.fuse(copy.deepcopy(unfused), return_report=True)
    assert convs == 57 and len(report.fused) == convs and not report.left
    assert fused_activations(model) == ["silu"] * convs
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # 2x2 at stride 32: BatchNorm well enough conditioned
    assert_same_model(unfused, ckbn.convert_model(copy.deepcopy(unfused)), model, x)
    # ultralytics folds each Conv's BatchNorm into its convolution and still calls its activation
    with torch.no_grad():
        assert relative_error(model.fuse(verbose=False)(x)[0], unfused(x)[0]) <= TOLERANCE


@pytest.mark.parametrize(
    "convert, batches", [(None, 6), (ckbn.fuse, 3), (lambda m: ckbn.convert_model(m, fuse_activations=True), 3)]
)
def test_ultralytics_conv_counts_checkpointed_batches_once(ultralytics, convert, batches):
    """torch's BatchNorm counts each checkpointed batch twice; the fused ckbn module once."""
    from ultralytics.nn.modules import Conv

    conv = Conv(3, 8)
    conv = convert(conv) if convert else conv
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        torch.utils.checkpoint.checkpoint(conv, x, use_reentrant=False).sum().backward()
    assert conv.bn.num_batches_tracked.item() == batches
