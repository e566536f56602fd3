"""The ckbn operators against ckbn.reference and against torch itself, computed in float64.

The implementation under test is ``ckbn.ops``: the compiled kernels (torch.ops.ckbn), or
the reference when CKBN_BACKEND=reference. Each op is compared with the reference (same dtypes,
shapes and memory format) and with an independent oracle: torch.var_mean, F.batch_norm and
autograd in float64.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import ckbn  # noqa: F401  (loads the compiled operators)
from ckbn import ops, reference

EPS = 1e-5

SHAPES = {
    "nc": (6, 3),
    "ncl": (4, 3, 7),
    "nchw": (3, 5, 4, 6),
    "ncdhw": (2, 3, 3, 4, 5),
    "one_channel": (4, 1, 5, 5),
    "one_pixel": (8, 5, 1, 1),
    "two_per_channel": (2, 4, 1),
    "many_channels": (2, 70, 3, 3),  # channels not a multiple of any vector width
}

# How an input is laid out in memory; each applies to some numbers of dimensions.
LAYOUTS = {
    "contiguous": lambda dim: True,
    "channels_last": lambda dim: dim == 4,
    "channels_last_3d": lambda dim: dim == 5,
    "channels_innermost": lambda dim: dim == 3,  # (N, L, C) transposed to (N, C, L)
    "reversed": lambda dim: True,  # every stride reversed: dense but in no kernel layout
    "sliced": lambda dim: True,  # every other element of the last dimension
}

CASES = [
    pytest.param(shape, layout, id=f"{name}-{layout}")
    for name, shape in SHAPES.items()
    for layout, applies in LAYOUTS.items()
    if applies(len(shape))
]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Tolerances for a result in each dtype; statistics (fp32 for half input) use the stats dtype's.
TOLERANCE = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


def make_input(shape, layout, dtype, device, scale=2.0, offset=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = len(shape)
    if layout == "reversed":
        base = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).permute(*reversed(range(dim)))
    elif layout == "channels_innermost":
        base = torch.randn((shape[0], shape[2], shape[1]), generator=gen, dtype=torch.float64).transpose(1, 2)
    elif layout == "sliced":
        wide = shape[:-1] + (2 * shape[-1],)
        base = torch.randn(wide, generator=gen, dtype=torch.float64)[..., ::2]
    else:
        base = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = (base * scale + offset).to(device=device, dtype=dtype)  # .to keeps the strides
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    assert x.shape == shape
    return x


def channel_vector(channels, dtype, device, seed, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(channels, generator=gen, dtype=torch.float64) + offset).to(device=device, dtype=dtype)


def stats_dtype(dtype):
    return reference.stats_dtype(dtype)


def reduce_dims(x):
    return (0,) + tuple(range(2, x.dim()))


def per_channel(vec, x):
    return vec.reshape((1, -1) + (1,) * (x.dim() - 2))


def assert_close(actual, expected, dtype):
    """actual against expected (float64 oracle or reference) at the tolerance of `dtype` results."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **TOLERANCE[dtype])


def expected_memory_format(x):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def assert_like_input(out, x):
    """An element-wise result: input's shape, dtype, device and memory format."""
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.is_contiguous(memory_format=expected_memory_format(x))


def affine(kind, channels, input_dtype, device, seed):
    """weight or bias: absent, of input's dtype, or of the statistics dtype (fp32 beside half input)."""
    if kind == "none":
        return None
    dtype = input_dtype if kind == "input_dtype" else stats_dtype(input_dtype)
    return channel_vector(channels, dtype, device, seed, offset=1.0)


def oracle_forward(x, weight, bias):
    """Training-mode batch norm in float64, by torch."""
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    return F.batch_norm(x.double(), None, None, w, b, training=True, eps=EPS)


# --------------------------------------------------------------------------------------------
# batch_stats, normalize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES)
def test_batch_stats(shape, layout, dtype, device):
    x = make_input(shape, layout, dtype, device)
    mean, invstd = ops.batch_stats(x, EPS)
    acc = stats_dtype(dtype)
    assert mean.dtype == acc and invstd.dtype == acc and mean.shape == (shape[1],)

    ref_mean, ref_invstd = reference.batch_stats(x, EPS)
    assert_close(mean, ref_mean, acc)
    assert_close(invstd, ref_invstd, acc)

    var, expected_mean = torch.var_mean(x.double(), dim=reduce_dims(x), correction=0)
    assert_close(mean, expected_mean, acc)
    assert_close(invstd, torch.rsqrt(var + EPS), acc)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES)
def test_normalize(shape, layout, dtype, device):
    x = make_input(shape, layout, dtype, device)
    weight = affine("input_dtype", shape[1], dtype, device, seed=1)
    bias = affine("input_dtype", shape[1], dtype, device, seed=2)
    mean, invstd = ops.batch_stats(x, EPS)
    y = ops.normalize(x, mean, invstd, weight, bias)
    assert_like_input(y, x)
    assert_close(y, reference.normalize(x, mean, invstd, weight, bias), dtype)
    assert_close(y, oracle_forward(x, weight, bias), dtype)


@pytest.mark.parametrize("weight_kind", ["none", "input_dtype", "stats_dtype"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalize_affine_dtypes(weight_kind, dtype, device):
    x = make_input((4, 3, 5, 5), "channels_last", dtype, device)
    weight = affine(weight_kind, 3, dtype, device, seed=1)
    bias = affine(weight_kind, 3, dtype, device, seed=2)
    mean, invstd = ops.batch_stats(x, EPS)
    y = ops.normalize(x, mean, invstd, weight, bias)
    assert y.dtype == dtype
    assert_close(y, reference.normalize(x, mean, invstd, weight, bias), dtype)
    assert_close(y, oracle_forward(x, weight, bias), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_variance_of_offset_data(layout, device):
    """Data far from zero: sum and sum of squares would cancel; merged moments must not."""
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + 0.1 * torch.randn(16, 4, 24, 24, generator=gen)).to(device)
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    mean, invstd = ops.batch_stats(x, 0.0)
    var = 1.0 / invstd.double() ** 2
    expected_var, expected_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(var.cpu(), expected_var.cpu(), rtol=1e-2, atol=0)
    torch.testing.assert_close(mean.double().cpu(), expected_mean.cpu(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 70, 70), (4, 8, 64, 64)], ids=str)
def test_inputs_split_into_chunks_and_threads(shape, layout, threads, device):
    """Inputs big enough that kernels merge several chunks per channel and split work between threads."""
    x, dy, weight, _, _ = backward_inputs(shape, layout, torch.float32, device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mean, invstd = ops.batch_stats(x, EPS)
        grads = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True])
    finally:
        torch.set_num_threads(previous)
    var, expected_mean = torch.var_mean(x.double(), dim=reduce_dims(x), correction=0)
    assert_close(mean, expected_mean, torch.float32)
    assert_close(invstd, torch.rsqrt(var + EPS), torch.float32)
    for actual, expected in zip(grads, oracle_backward(x, dy, weight, mean, invstd, True)):
        torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (2, 3, 0)], ids=str)
def test_empty_batch(shape, device):
    x = torch.empty(shape, device=device)
    mean, invstd = ops.batch_stats(x, EPS)
    assert torch.equal(mean.cpu(), torch.zeros(3))
    torch.testing.assert_close(invstd.cpu(), torch.full((3,), 1 / math.sqrt(EPS)))
    weight = torch.ones(3, device=device)
    y = ops.normalize(x, mean, invstd, weight, None)
    assert y.shape == shape
    grad_input, grad_weight, grad_bias = ops.backward(x, x, mean, invstd, weight, True, [True, True, True])
    assert grad_input.shape == shape
    assert torch.equal(grad_weight.cpu(), torch.zeros(3)) and torch.equal(grad_bias.cpu(), torch.zeros(3))
    sum_dy, sum_dy_xmu = ops.backward_reduce(x, x, mean)
    assert torch.equal(sum_dy.cpu(), torch.zeros(3)) and torch.equal(sum_dy_xmu.cpu(), torch.zeros(3))


# --------------------------------------------------------------------------------------------
# update_running_stats


@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64], ids=str)
def test_update_running_stats(momentum, buffer_dtype, input_dtype, device):
    x = make_input((4, 3, 5, 5), "contiguous", input_dtype, device)
    count = x.numel() // x.size(1)
    running_mean = channel_vector(3, buffer_dtype, device, seed=4)
    running_var = channel_vector(3, buffer_dtype, device, seed=5, offset=2.0).abs()
    num_batches_tracked = torch.tensor(3, device=device)
    mean, invstd = ops.batch_stats(x, EPS)

    state = [t.clone() for t in (running_mean, running_var, num_batches_tracked)]
    ref_state = [t.clone() for t in state]
    ops.update_running_stats(*state, mean, invstd, momentum, EPS, count)
    reference.update_running_stats(*ref_state, mean, invstd, momentum, EPS, count)
    assert state[2].item() == 4 and ref_state[2].item() == 4
    # The average is taken in the statistics dtype and stored in the buffer's.
    tolerance_dtype = max(buffer_dtype, input_dtype, key=lambda d: torch.finfo(d).eps)
    for actual, expected in zip(state[:2], ref_state[:2]):
        assert actual.dtype == buffer_dtype
        assert_close(actual, expected, tolerance_dtype)

    # torch's BatchNorm: momentum=None is the cumulative average over the batches tracked.
    factor = momentum if momentum is not None else 1.0 / 4
    expected_mean, expected_var = running_mean.double(), running_var.double()
    F.batch_norm(x.double(), expected_mean, expected_var, training=True, momentum=factor, eps=EPS)
    assert_close(state[0], expected_mean, tolerance_dtype)
    assert_close(state[1], expected_var, tolerance_dtype)


def test_update_running_stats_needs_two_values(device):
    stats = [torch.zeros(3, device=device) for _ in range(4)]
    with pytest.raises(RuntimeError, match="count of at least 2"):
        ops.update_running_stats(stats[0], stats[1], torch.tensor(0, device=device), stats[2], stats[3], 0.1, EPS, 1)


# --------------------------------------------------------------------------------------------
# backward, backward_reduce, backward_elemt


def oracle_backward(x, dy, weight, mean, invstd, train):
    """Gradients of F.batch_norm by autograd in float64; eval mode holds mean and invstd constant."""
    x64 = x.double().requires_grad_()
    w64 = (weight.double() if weight is not None else torch.ones(x.size(1), dtype=torch.float64)).requires_grad_()
    b64 = torch.zeros(x.size(1), dtype=torch.float64, requires_grad=True)
    if train:
        y = F.batch_norm(x64, None, None, w64, b64, training=True, eps=EPS)
    else:
        var = 1.0 / invstd.double() ** 2 - EPS
        y = F.batch_norm(x64, mean.double(), var, w64, b64, training=False, eps=EPS)
    y.backward(dy.double())
    return x64.grad, w64.grad, b64.grad


def backward_inputs(shape, layout, dtype, device, weight_kind="input_dtype"):
    x = make_input(shape, layout, dtype, device)
    dy = make_input(shape, layout, dtype, device, scale=1.0, offset=0.1, seed=7)
    weight = affine(weight_kind, shape[1], dtype, device, seed=1)
    mean, invstd = ops.batch_stats(x, EPS)
    return x, dy, weight, mean, invstd


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES)
def test_backward(shape, layout, dtype, train, device):
    x, dy, weight, mean, invstd = backward_inputs(shape, layout, dtype, device)
    grads = ops.backward(dy, x, mean, invstd, weight, train, [True, True, True])
    ref_grads = reference.backward(dy, x, mean, invstd, weight, train, [True, True, True])
    oracle = oracle_backward(x, dy, weight, mean, invstd, train)
    assert_like_input(grads[0], x)
    for actual, ref, expected in zip(grads, ref_grads, oracle):
        assert actual.dtype == ref.dtype
        assert_close(actual, ref, dtype)
        assert_close(actual, expected, dtype)


@pytest.mark.parametrize(
    "mask", [[True, False, False], [False, True, False], [False, False, True], [False, True, True], [False] * 3]
)
@pytest.mark.parametrize("weight_kind", ["none", "input_dtype", "stats_dtype"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_output_mask(mask, weight_kind, dtype, train, device):
    # In eval with an all-false mask nothing needs computing: no kernel may write the empty grad_input.
    x, dy, weight, mean, invstd = backward_inputs((3, 4, 5), "contiguous", dtype, device, weight_kind)
    grads = ops.backward(dy, x, mean, invstd, weight, train, mask)
    oracle = oracle_backward(x, dy, weight, mean, invstd, train)
    param_dtype = weight.dtype if weight is not None else stats_dtype(dtype)
    for needed, actual, expected, out_dtype in zip(mask, grads, oracle, (dtype, param_dtype, param_dtype)):
        assert actual.dtype == out_dtype
        if needed:
            assert_close(actual, expected, dtype)
        else:
            assert actual.shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES)
def test_backward_reduce_and_elemt(shape, layout, dtype, device):
    """The two halves of the training backward give what the fused op and autograd give."""
    x, dy, weight, mean, invstd = backward_inputs(shape, layout, dtype, device)
    sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean)
    ref_sum_dy, ref_sum_dy_xmu = reference.backward_reduce(dy, x, mean)
    acc = stats_dtype(dtype)
    assert sum_dy.dtype == acc and sum_dy_xmu.dtype == acc
    x64, dy64 = x.double(), dy.double()
    expected_sum_dy = dy64.sum(dim=reduce_dims(x))
    expected_sum_dy_xmu = (dy64 * (x64 - per_channel(mean.double(), x))).sum(dim=reduce_dims(x))
    for actual, ref, expected in (
        (sum_dy, ref_sum_dy, expected_sum_dy),
        (sum_dy_xmu, ref_sum_dy_xmu, expected_sum_dy_xmu),
    ):
        assert_close(actual, ref, acc)
        assert_close(actual, expected, acc)

    count = x.numel() // x.size(1)
    grad_input = ops.backward_elemt(dy, x, mean, invstd, weight, sum_dy / count, sum_dy_xmu / count)
    assert_like_input(grad_input, x)
    assert_close(
        grad_input, reference.backward_elemt(dy, x, mean, invstd, weight, sum_dy / count, sum_dy_xmu / count), dtype
    )
    assert_close(grad_input, oracle_backward(x, dy, weight, mean, invstd, True)[0], dtype)


def test_backward_grad_output_in_another_memory_format(device):
    x, dy, weight, mean, invstd = backward_inputs((3, 4, 5, 6), "channels_last", torch.float32, device)
    dy = dy.contiguous()
    grads = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True])
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    for actual, expected in zip(grads, oracle_backward(x, dy, weight, mean, invstd, True)):
        assert_close(actual, expected, torch.float32)


# --------------------------------------------------------------------------------------------
# Registration and bad input


def opcheck_cases(layout):
    x, dy, weight, mean, invstd = backward_inputs((3, 4, 5, 6), layout, torch.float32, "cpu")
    bias = affine("input_dtype", 4, torch.float32, "cpu", seed=2)
    count = x.numel() // x.size(1)
    sum_dy, sum_dy_xmu = reference.backward_reduce(dy, x, mean)
    state = (torch.zeros(4), torch.ones(4), torch.tensor(0))
    return {
        "batch_stats": (x, EPS),
        "normalize": (x, mean, invstd, weight, bias),
        "update_running_stats": state + (mean, invstd, 0.1, EPS, count),
        "backward": (dy, x, mean, invstd, weight, True, [True, True, True]),
        "backward_reduce": (dy, x, mean),
        "backward_elemt": (dy, x, mean, invstd, weight, sum_dy / count, sum_dy_xmu / count),
    }


@pytest.mark.parametrize("op", ops.OP_NAMES)
def test_wrapper_has_the_schemas_arguments_and_runs_the_active_backend(op):
    """Each ckbn.ops wrapper takes the arguments of the op's schema (csrc/ops.cpp), by name and in
    order, as the reference does, and ckbn.ops.implementation names what runs it."""
    wrapper = list(inspect.signature(getattr(ops, op)).parameters)
    assert wrapper == list(inspect.signature(getattr(reference, op)).parameters)
    if ops.extension_loaded:
        schema = getattr(torch.ops.ckbn, op).default._schema
        assert wrapper == [argument.name for argument in schema.arguments]
        assert ops.implementation(op) is getattr(torch.ops.ckbn, op).default
    else:
        assert ops.implementation(op) is getattr(reference, op)


@pytest.mark.skipif(ckbn.backend() != "extension", reason="opcheck checks the compiled registration")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ops.OP_NAMES)
def test_opcheck(op, layout):
    torch.library.opcheck(ops.implementation(op), opcheck_cases(layout)[op])


BAD_INPUTS = {
    "integer dtype": (lambda d: torch.ones(4, 3, 2, dtype=torch.int64, device=d), 3, "floating dtype"),
    "1-D input": (lambda d: torch.ones(4, device=d), 4, "at least 2 dimensions"),
    "wrong channel count": (lambda d: torch.ones(4, 3, 2, device=d), 5, "should contain 3 elements not 5"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case, device):
    make, channels, message = BAD_INPUTS[case]
    x = make(device)
    vec = torch.ones(channels, device=device)
    calls = {
        "batch_stats": lambda: ops.batch_stats(x, EPS),
        "normalize": lambda: ops.normalize(x, vec, vec, None, None),
        "backward": lambda: ops.backward(x, x, vec, vec, None, True, [True, True, True]),
        "backward_reduce": lambda: ops.backward_reduce(x, x, vec),
        "backward_elemt": lambda: ops.backward_elemt(x, x, vec, vec, None, vec, vec),
    }
    if case == "wrong channel count":
        del calls["batch_stats"]  # it takes no per-channel argument
    for call in calls.values():
        with pytest.raises(RuntimeError, match=message):
            call()


def test_mismatched_grad_output_and_affine_dtype(device):
    x = torch.ones(4, 3, 2, device=device)
    vec = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="grad_output of shape"):
        ops.backward(torch.ones(4, 3, 3, device=device), x, vec, vec, None, True, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_output of dtype"):
        ops.backward_reduce(x.double(), x, vec)
    with pytest.raises(RuntimeError, match="weight of dtype"):
        ops.normalize(x, vec, vec, vec.double(), None)


@pytest.mark.cuda
def test_wrong_device(device):
    if device != "cuda":
        pytest.skip("needs a second device")
    x = torch.ones(4, 3, 2, device=device)
    vec = torch.ones(3)
    with pytest.raises(RuntimeError, match="same device"):
        ops.normalize(x, vec.to(device), vec.to(device), vec, None)
    with pytest.raises(RuntimeError, match="same device"):
        ops.backward(x.cpu(), x, vec.to(device), vec.to(device), None, True, [True, True, True])
