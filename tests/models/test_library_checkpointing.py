"""Other libraries' own recompute paths, on models converted with plain ``ckbn.convert_model``:
timm's ``set_grad_checkpointing``, torchvision's DenseNet ``memory_efficient``, Ultralytics' YOLOv8n
with its blocks under ``torch.utils.checkpoint``, and the FSDP helper
``apply_activation_checkpointing`` with both of its checkpoint implementations.

Each test trains from the same weights (float64, CPU): one step of the converted model equals one
of torch's to 1e-10; then a few SGD steps checkpointed with torch's BatchNorm (which must drift, or
the test lost its point) and checkpointed after ``convert_model``, whose every buffer, parameter and
output must equal the converted model's trained unchecked: ``num_batches_tracked`` exactly, the
rest to 1e-12.
"""

import copy
import functools

import pytest
import torch
from helpers import tensors_of

import ckbn

STEPS = 3
RTOL, ATOL = 1e-12, 1e-14  # a checkpoint recomputes the same float64 operations


def train(model, make_input, steps=STEPS):
    """The last output after ``steps`` SGD steps on a fixed loss; the same inputs for every model."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same dropout masks in every model
        outputs = tensors_of(model(make_input(step)))
        loss = sum(
            (o * torch.randn(o.shape, generator=torch.Generator().manual_seed(step), dtype=o.dtype)).sum()
            for o in outputs
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [o.detach() for o in outputs]


def image_batches(shape):
    return lambda step: torch.randn(shape, generator=torch.Generator().manual_seed(10 + step), dtype=torch.float64)


def counts(model):
    return {name: b.item() for name, b in model.named_buffers() if name.endswith("num_batches_tracked")}


def named(tensors):
    """By the names of the unwrapped model: FSDP's checkpoint_wrapper adds a prefix of its own."""
    return {name.replace("_checkpoint_wrapped_module.", ""): t for name, t in tensors}


def assert_close_models(ours, theirs, rtol, atol, kinds=("named_buffers", "named_parameters")):
    for kind in kinds:
        mine, truth = named(getattr(ours, kind)()), dict(getattr(theirs, kind)())
        assert mine.keys() == truth.keys()
        for name, tensor in mine.items():
            torch.testing.assert_close(tensor, truth[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_exact_under_checkpointing(model, enable_checkpointing, make_input):
    """``model`` trained three ways: checkpointed after convert_model it equals the converted model
    unchecked, counts each batch once, and (first step) equals torch's; torch's own BatchNorm drifts."""
    converted, report = ckbn.convert_model(copy.deepcopy(model), return_report=True)
    assert report.converted and not report.counts_twice, str(report)

    # One step from the same weights: ckbn's layers compute what torch's do.
    first_torch, first_ckbn = copy.deepcopy(model), copy.deepcopy(converted)
    for a, e in zip(train(first_ckbn, make_input, steps=1), train(first_torch, make_input, steps=1)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    assert_close_models(first_ckbn, first_torch, rtol=1e-10, atol=1e-12, kinds=("named_buffers",))
    # The step's updates as one vector: a single weight's can be a sum that cancels to its rounding.
    ours, theirs, initial = (
        torch.cat([p.flatten() for _, p in sorted(named(m.named_parameters()).items())])
        for m in (first_ckbn, first_torch, model)
    )
    assert ((ours - theirs).norm() / (theirs - initial).norm()).item() <= 1e-10

    # Several steps: the checkpoint changes nothing. Training amplifies rounding step by step (BatchNorm
    # over a handful of values per channel), so the unchecked truth here is ckbn's own model.
    torch_checkpointed = enable_checkpointing(copy.deepcopy(model))
    ckbn_checkpointed = enable_checkpointing(copy.deepcopy(converted))
    expected = train(converted, make_input)
    train(torch_checkpointed, make_input)
    actual = train(ckbn_checkpointed, make_input)
    assert STEPS * 2 in counts(torch_checkpointed).values(), "torch's BatchNorm no longer counts twice here"
    assert set(counts(converted).values()) == {STEPS}
    assert named(counts(ckbn_checkpointed).items()) == counts(converted)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL)
    assert_close_models(ckbn_checkpointed, converted, rtol=RTOL, atol=ATOL)


# timm families with BatchNorm (timm's BatchNormAct2d or torch's) and set_grad_checkpointing.
TIMM_MODELS = [
    "resnet18",
    "efficientnet_b0",
    "regnetx_002",
    "mobilenetv3_small_050",
    "rexnet_100",
    "ghostnet_050",
    "repvgg_a0",
    pytest.param("densenet121", marks=pytest.mark.slow),
]


def with_timm_checkpointing(model):
    model.set_grad_checkpointing(True)
    return model


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_set_grad_checkpointing(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).double()
    assert_exact_under_checkpointing(model, with_timm_checkpointing, image_batches((4, 3, 32, 32)))


@pytest.mark.slow
def test_torchvision_densenet_memory_efficient():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=10).double()

    def memory_efficient(m):
        for layer in m.modules():
            if isinstance(layer, torchvision.models.densenet._DenseLayer):
                layer.memory_efficient = True  # what densenet121(memory_efficient=True) sets
        return m

    assert_exact_under_checkpointing(model, memory_efficient, image_batches((4, 3, 32, 32)))


def test_ultralytics_yolov8n_blocks_checkpointed(ultralytics):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False).double()

    def checkpoint_blocks(m):
        # DetectionModel runs its blocks in a loop that reads their routing attributes (f, i), so
        # each block keeps its place and takes a checkpointed forward.
        for block in m.model:
            block.forward = functools.partial(
                torch.utils.checkpoint.checkpoint, type(block).forward.__get__(block), use_reentrant=False
            )
        return m

    assert_exact_under_checkpointing(model, checkpoint_blocks, image_batches((2, 3, 64, 64)))


@pytest.mark.parametrize("implementation", ["REENTRANT", "NO_REENTRANT"])
def test_fsdp_apply_activation_checkpointing(implementation):
    torchvision = pytest.importorskip("torchvision")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=getattr(CheckpointImpl, implementation))

    def wrap_blocks(m):
        block = torchvision.models.resnet.BasicBlock
        apply_activation_checkpointing(
            m, checkpoint_wrapper_fn=wrapper, check_fn=lambda layer: isinstance(layer, block)
        )
        return m

    make_input = image_batches((4, 3, 32, 32))
    if implementation == "REENTRANT":
        # The reentrant checkpoint computes parameter gradients only through inputs that require grad.
        make_input = lambda step, make=make_input: make(step).requires_grad_()  # noqa: E731
    assert_exact_under_checkpointing(model, wrap_blocks, make_input)
