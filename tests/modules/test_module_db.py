"""ckbn's modules driven by PyTorch's own test data for torch.nn.BatchNorm1d/2d/3d.

``torch.testing._internal.common_modules.module_db`` carries, for each of torch's BatchNorm classes,
the constructor arguments and inputs torch's own suite runs (affine or not, momentum=None, not
tracking statistics, an empty batch, bias=False) and the inputs the module must reject. Each is run
on ckbn's class and on torch's side by side: outputs, input and parameter gradients, buffers,
memory formats, exception types and messages; float64 and float32; train and eval.

Where ckbn differs from torch on purpose the test says so and checks ckbn's rule instead:

* an empty batch counts nothing, where torch adds one to ``num_batches_tracked``;
* a call that raises changes nothing, where torch counts the batch before it rejects eps.
"""

import re

import pytest
import torch

_flags_were_frozen = torch.backends.flags_frozen()
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

if not _flags_were_frozen:  # importing torch's test utilities freezes torch.backends flags for the whole session
    vars(torch.backends)["__allow_nonbracketed_mutation_flag"] = True

from helpers import raised  # noqa: E402

import ckbn  # noqa: E402

CKBN_CLASSES = {
    torch.nn.BatchNorm1d: ckbn.BatchNorm1d,
    torch.nn.BatchNorm2d: ckbn.BatchNorm2d,
    torch.nn.BatchNorm3d: ckbn.BatchNorm3d,
}
INFOS = [info for info in module_db if info.module_cls in CKBN_CLASSES]
DTYPES = [torch.float64, torch.float32]
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=2e-5)}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _module_inputs(info, device="cpu", dtype=torch.float64, training=True):
    return info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True, training=training)


def _error_inputs(info, device="cpu", dtype=torch.float64, training=True):
    return info.module_error_inputs_func(info, device=device, dtype=dtype, requires_grad=False, training=training)


def _layouts(module_input):
    (x,) = module_input.forward_input.args
    return ["contiguous"] + (["channels_last"] if x.dim() in CHANNELS_LAST else [])


CASES = [
    pytest.param(info, index, layout, id=f"{info.name}-{module_input.desc or 'default'}-{layout}")
    for info in INFOS
    for index, module_input in enumerate(_module_inputs(info))
    for layout in _layouts(module_input)
]
ERROR_CASES = [
    pytest.param(info, index, id=f"{info.name}-{error_input.module_error_input.constructor_input.kwargs}")
    for info in INFOS
    for index, error_input in enumerate(_error_inputs(info))
]


def test_module_db_holds_torch_batch_norm_data():
    """The oracle is really there: three classes, each with inputs and error inputs."""
    assert sorted(info.name for info in INFOS) == ["nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d"]
    assert len(CASES) >= 3 * 7 and len(ERROR_CASES) >= 3 * 2
    assert any("zero_batch" in case.id for case in CASES)


def _pair(info, module_input, device, dtype):
    """torch's module and ckbn's, built from the same constructor input, with the same random state."""
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    theirs = info.module_cls(*args, **kwargs).to(device=device, dtype=dtype)
    ours = CKBN_CLASSES[info.module_cls](*args, **kwargs).to(device=device, dtype=dtype)
    with torch.no_grad():  # weights and running statistics away from their identity defaults
        for name, tensor in theirs.state_dict().items():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5) if name in ("weight", "running_var") else tensor.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _torch_eval_grad_input_is_contiguous(theirs, x, training, layout) -> bool:
    """Whether torch's own backward gives a contiguous grad_input where ckbn keeps x's layout: on
    CUDA, in eval mode with running statistics, for channels_last input."""
    uses_running_stats = not training and theirs.running_mean is not None
    return x.is_cuda and uses_running_stats and layout == "channels_last" and x.numel() > 0


def _run(module, x, grad_output):
    """Output, then the gradients of input and of each parameter (None where absent)."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    params = [p for _, p in sorted(module.named_parameters())]
    grads = torch.autograd.grad(y, [x] + params, grad_output, allow_unused=True)
    return y.detach(), grads


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,index,layout", CASES)
def test_module_db_input_matches_torch(device, info, index, layout, dtype, training):
    torch.manual_seed(0)
    module_input = _module_inputs(info, device, dtype, training)[index]
    theirs, ours = _pair(info, module_input, device, dtype)
    theirs.train(training)
    ours.train(training)
    (x,) = module_input.forward_input.args
    memory_format = CHANNELS_LAST[x.dim()] if layout == "channels_last" else torch.contiguous_format
    tol = TOLERANCE[dtype]
    steps = 2  # two steps: momentum=None averages over num_batches_tracked
    for step in range(steps):
        x_step = (x.detach() * (1 + step) + step).contiguous(memory_format=memory_format)
        grad_output = torch.randn_like(x_step)
        y_theirs, grads_theirs = _run(theirs, x_step, grad_output)
        y_ours, grads_ours = _run(ours, x_step, grad_output)
        torch.testing.assert_close(y_ours, y_theirs, **tol)
        assert y_ours.stride() == y_theirs.stride()
        for g_ours, g_theirs in zip(grads_ours, grads_theirs):
            assert (g_ours is None) == (g_theirs is None)
            if g_theirs is not None:
                torch.testing.assert_close(g_ours, g_theirs, **tol)
        if _torch_eval_grad_input_is_contiguous(theirs, x_step, training, layout):
            # torch's CUDA eval-mode backward allocates grad_input contiguous whatever the input's
            # layout (batch_norm_elementwise_backward_eval; seen on an H200, torch 2.11); ckbn keeps
            # the input's, as torch does on the CPU and in training (README, Limits).
            assert grads_theirs[0].is_contiguous()
            assert grads_ours[0].is_contiguous(memory_format=memory_format)
        else:
            assert grads_ours[0].stride() == grads_theirs[0].stride()

    # ckbn's rule, not torch's: an empty batch counts nothing (README, Limits).
    counted_by_torch_only = steps if x.numel() == 0 and training and theirs.track_running_stats else 0
    for key, value in theirs.state_dict().items():
        if key == "num_batches_tracked":
            assert value.item() - ours.state_dict()[key].item() == counted_by_torch_only
        else:
            torch.testing.assert_close(ours.state_dict()[key], value, **tol, msg=key)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info,index", ERROR_CASES)
def test_module_db_error_input_matches_torch(device, info, index, dtype, training):
    """The same exception, type and message, as torch's module; and, unlike torch's, no state changed."""
    error_input = _error_inputs(info, device, dtype, training)[index]
    assert error_input.error_on == ModuleErrorEnum.FORWARD_ERROR
    module_input = error_input.module_error_input
    theirs, ours = _pair(info, module_input, device, dtype)
    theirs.train(training)
    ours.train(training)
    (x,) = module_input.forward_input.args
    before = {key: value.clone() for key, value in ours.state_dict().items()}

    torch_error = raised(lambda: theirs(x))
    ckbn_error = raised(lambda: ours(x))
    if training:  # what torch's own suite expects of its module (eps <= 0 in training)
        for error in (torch_error, ckbn_error):
            assert isinstance(error, error_input.error_type) and re.search(error_input.error_regex, str(error))
    if torch_error is None:  # in eval mode eps=0 is valid
        assert ckbn_error is None
        torch.testing.assert_close(ours(x), theirs(x), **TOLERANCE[dtype])
        return
    assert type(ckbn_error) is type(torch_error)
    assert str(ckbn_error) == str(torch_error)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key
    # torch counts the batch before it rejects it; ckbn checks first.
    assert theirs.num_batches_tracked.item() == int(training)
