"""ckbn.convert_model on torchvision models: a training step equals the torch-BN model's, running
statistics equal an unchecked run's (also under DenseNet's internal checkpointing), and a converted
state_dict gives torch's eval outputs.

float64 on CPU, random initialisation with a fixed seed (no pretrained weights), small inputs. In
float32 the comparison would pass or fail by luck of rounding: a pre-activation within a few ulp of
zero lands on either side of it in two correct implementations, its ReLU mask flips, and that one
element moves DenseNet-121's gradient vector by 5e-3. In float64 the rounding differences are near
1e-15, far below the 1e-10 these tests allow, and any real difference is far above it.
Gradients are compared as one vector over all parameters: some single gradients are sums that cancel
to almost nothing (DenseNet's norm0.weight: norm 5e-4 from terms of order 1), whose relative error
measures only rounding; a wrong gradient anywhere still moves the whole vector far beyond 1e-10.
"""

import copy

import pytest
import torch

import ckbn

torchvision = pytest.importorskip("torchvision")

INPUT_SHAPE = (4, 3, 64, 64)
TOLERANCE = 1e-10


def build(name, **kwargs):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10, **kwargs).double()


def sample_input(scale=1.0):
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * scale


def train_step(model):
    """Output and gradient (all parameters, one vector) of one training step."""
    torch.manual_seed(2)  # the same dropout mask in every model
    y = model(sample_input())
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)).sum().backward()
    return y.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def assert_relative(actual, expected, what):
    error = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error <= TOLERANCE, f"{what}: relative error {error:.2e} > {TOLERANCE:.0e}"


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def assert_buffers_match(ours, theirs):
    for (name, b_ours), b_theirs in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b_ours, b_theirs, rtol=TOLERANCE, atol=1e-12, msg=lambda m: f"{name}: {m}")


def convert(model):
    converted = ckbn.convert_model(copy.deepcopy(model))
    ckbn_types = (ckbn.BatchNorm1d, ckbn.BatchNorm2d, ckbn.BatchNorm3d)
    assert len(batch_norms(converted)) == len(batch_norms(model)) > 0
    assert all(isinstance(m, ckbn_types) for m in batch_norms(converted))
    return converted


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_training_step_matches_torch(name):
    theirs = build(name)
    ours = convert(theirs)
    y_theirs, grad_theirs = train_step(theirs)
    y_ours, grad_ours = train_step(ours)
    assert_relative(y_ours, y_theirs, "output")
    assert_relative(grad_ours, grad_theirs, "gradient")
    assert_buffers_match(ours, theirs)


@pytest.mark.slow
def test_densenet_memory_efficient_statistics_stay_exact():
    """DenseNet's memory_efficient mode checkpoints each layer's norm1; torch's BN counts those batches
    twice, ckbn's match the unchecked network."""
    unchecked = build("densenet121")
    checked = build("densenet121", memory_efficient=True)
    checked.load_state_dict(unchecked.state_dict())
    ours = convert(checked)

    y_unchecked, grad_unchecked = train_step(unchecked)
    train_step(checked)
    y_ours, grad_ours = train_step(ours)

    checked_buffers, unchecked_buffers = dict(checked.named_buffers()), dict(unchecked.named_buffers())
    drifted = [name for name, b in checked_buffers.items() if name.endswith("num_batches_tracked") and b.item() == 2]
    assert drifted, "torch's BN no longer updates twice under checkpointing: this test lost its point"
    running_var = drifted[0].replace("num_batches_tracked", "running_var")
    assert not torch.allclose(checked_buffers[running_var], unchecked_buffers[running_var])
    assert_relative(y_ours, y_unchecked, "output")
    assert_relative(grad_ours, grad_unchecked, "gradient")
    assert_buffers_match(ours, unchecked)


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", pytest.param("densenet121", marks=pytest.mark.slow)]
)
def test_converted_state_dict_gives_torch_eval_outputs(name):
    theirs = build(name)
    with torch.no_grad():
        theirs(sample_input(scale=3.0) + 1)  # running statistics away from their initial values
    ours = ckbn.convert_model(build(name))
    ours.load_state_dict(theirs.state_dict())  # strict: the same keys
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        assert_relative(ours(sample_input()), theirs(sample_input()), "eval output")
