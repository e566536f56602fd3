"""torch.compile of ckbn modules: one graph, eager's numbers, running statistics updated exactly once.

Compiling is slow on CPU, so each compiled model is built once per module (fixtures below) and the
tests assert on what it recorded.
"""

import copy

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from conftest import DEVICES

import ckbn

STEPS = 2
# Relative (norm-wise) error allowed between compiled and eager fp32. The compiled extension's ops are
# opaque to inductor and must agree to 1e-5 on CPU; on CUDA inductor may pick other convolution
# algorithms than eager. On the reference backend inductor generates the BN arithmetic itself, with
# other summation orders, and BN bias gradients (sums of mean-free terms) amplify that rounding.
TOLERANCE = {"cpu": 1e-5 if ckbn.backend() == "extension" else 3e-5, "cuda": 1e-4}


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # earlier modules' compiled frames must not count towards recompile limits
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module", params=DEVICES)
def compile_device(request):
    if request.param == "cuda":
        # Eager and compiled convolutions would round differently in TF32.
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        yield "cuda"
        torch.backends.cudnn.allow_tf32 = tf32
    else:
        yield request.param


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, tolerance, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    error = relative_error(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.2e} > {tolerance:.0e}"


class ConvNet(torch.nn.Module):
    """conv-BN-ReLU twice (the second BN with cumulative averaging), then a linear head."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
            ckbn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1, bias=False),
            ckbn.BatchNorm2d(16, momentum=None),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(16, 6)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def make_pair(device):
    torch.manual_seed(0)
    eager = ConvNet().to(device)
    with torch.no_grad():
        for module in eager.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return eager, copy.deepcopy(eager)


def batches(device, count, shape=(8, 3, 8, 8)):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(shape, generator=generator) * 2 + 1).to(device) for _ in range(count)]


def train_steps(model, module, inputs):
    """Outputs of ``model`` and gradients of ``module``'s parameters in each step.

    The loss weighs the outputs with fixed random numbers: a loss symmetric in a training-mode BN's
    outputs, such as their sum of squares, has gradient zero and would compare rounding noise.
    """
    outputs, grads = [], []
    generator = torch.Generator().manual_seed(2)
    for x in inputs:
        module.zero_grad(set_to_none=True)
        y = model(x)
        (y * torch.randn(y.shape, generator=generator).to(y.device)).sum().backward()
        outputs.append(y.detach())
        grads.append({name: p.grad.clone() for name, p in module.named_parameters()})
    return outputs, grads


@pytest.fixture(scope="module")
def conv_net_runs(compile_device):
    """Training steps, then an eval forward, of the same network eager and fully compiled."""
    eager, twin = make_pair(compile_device)
    compiled = torch.compile(twin, fullgraph=True)  # fullgraph: a graph break is an error
    inputs = batches(compile_device, STEPS + 1)
    runs = {}
    for name, model, module in (("eager", eager, eager), ("compiled", compiled, twin)):
        outputs, grads = train_steps(model, module, inputs[:STEPS])
        module.eval()
        with torch.no_grad():
            eval_output = model(inputs[STEPS])
        runs[name] = dict(
            outputs=outputs,
            grads=grads,
            eval_output=eval_output,
            buffers={name: b.clone() for name, b in module.named_buffers()},
        )
    runs["tolerance"] = TOLERANCE[compile_device]
    return runs


def test_compiled_training_outputs_match_eager(conv_net_runs):
    for step, (ours, theirs) in enumerate(zip(conv_net_runs["compiled"]["outputs"], conv_net_runs["eager"]["outputs"])):
        assert_close(ours, theirs, conv_net_runs["tolerance"], f"output of step {step}")


def test_compiled_parameter_gradients_match_eager(conv_net_runs):
    for step, (ours, theirs) in enumerate(zip(conv_net_runs["compiled"]["grads"], conv_net_runs["eager"]["grads"])):
        assert ours.keys() == theirs.keys()
        for name in theirs:
            assert_close(ours[name], theirs[name], conv_net_runs["tolerance"], f"grad of {name}, step {step}")


def test_compiled_running_statistics_match_eager(conv_net_runs):
    ours, theirs = conv_net_runs["compiled"]["buffers"], conv_net_runs["eager"]["buffers"]
    assert ours.keys() == theirs.keys()
    for name in theirs:
        if name.endswith("num_batches_tracked"):
            assert ours[name].item() == theirs[name].item() == STEPS, name
        else:
            assert_close(ours[name], theirs[name], conv_net_runs["tolerance"], name)


def test_compiled_eval_matches_eager(conv_net_runs):
    assert_close(
        conv_net_runs["compiled"]["eval_output"],
        conv_net_runs["eager"]["eval_output"],
        conv_net_runs["tolerance"],
        "eval output",
    )


def checkpointed_blocks(use_reentrant):
    """Two conv-BN-ReLU blocks: the first under torch's checkpoint, the second under ckbn's."""
    blocks = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Conv2d(c_in, 8, 3, padding=1, bias=False), ckbn.BatchNorm2d(8), torch.nn.ReLU())
        for c_in in (3, 8)
    )

    def forward(x):
        x = torch_checkpoint.checkpoint(blocks[0], x, use_reentrant=use_reentrant)
        return ckbn.checkpoint(blocks[1], x)

    return blocks, forward


@pytest.mark.parametrize(
    "use_reentrant",
    [
        pytest.param(False, id="non_reentrant"),
        # The reentrant checkpoint is an autograd.Function that dynamo does not trace: a graph break,
        # after which the checkpointed blocks run eagerly with ckbn's recompute detection.
        pytest.param(True, id="reentrant"),
    ],
)
def test_checkpoint_inside_compile_keeps_statistics_exact(compile_device, use_reentrant):
    """The recompute of checkpointed regions, the compiler's included, never updates statistics twice."""
    torch.manual_seed(0)
    blocks, forward = checkpointed_blocks(use_reentrant)
    blocks.to(compile_device)
    reference = copy.deepcopy(blocks)  # run without any checkpoint
    compiled = torch.compile(forward, fullgraph=not use_reentrant)
    for x in batches(compile_device, STEPS):
        x.requires_grad_()
        compiled(x).square().mean().backward()
        reference[1](reference[0](x)).square().mean().backward()
    tolerance = TOLERANCE[compile_device]
    for (name, ours), theirs in zip(blocks.named_buffers(), reference.buffers()):
        if name.endswith("num_batches_tracked"):
            assert ours.item() == theirs.item() == STEPS, name
        else:
            assert_close(ours, theirs, tolerance, name)
    for (name, ours), theirs in zip(blocks.named_parameters(), reference.parameters()):
        assert_close(ours.grad, theirs.grad, tolerance, f"grad of {name}")


def test_dynamic_batch_size(compile_device):
    """Symbolic shapes through the fake kernels: one graph serves several batch sizes."""
    torch.manual_seed(0)
    eager = ckbn.BatchNorm2d(5).to(compile_device)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, dynamic=True)
    for batch in (3, 6):
        x = torch.randn(batch, 5, 4, 4, device=compile_device)
        assert_close(compiled(x), eager(x), TOLERANCE[compile_device], f"output of batch {batch}")
    for (name, ours), theirs in zip(twin.named_buffers(), eager.buffers()):
        assert_close(ours.double(), theirs.double(), TOLERANCE[compile_device], name)


def test_compiled_channels_last(compile_device):
    """Compiled output and input gradient keep channels_last, as eager's do."""
    torch.manual_seed(0)
    module = ckbn.BatchNorm2d(6).to(compile_device)
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True)
    x = torch.randn(2, 6, 5, 3, device=compile_device).contiguous(memory_format=torch.channels_last)
    for model in (module, compiled):
        x_ = x.detach().clone().requires_grad_()
        y = model(x_)
        y.backward(torch.randn_like(y))
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert x_.grad.is_contiguous(memory_format=torch.channels_last)
