"""The CUDA kernels against ckbn.reference (on the same GPU) and against torch's batch norm in
float64: the paths only a GPU runs (split reductions, vector loads, 64-bit indexing), CUDA graphs,
streams, and arguments on the wrong device."""

import pytest
import torch
import torch.nn.functional as F

import ckbn
from ckbn import reference as ref

CUDA_READY = torch.cuda.is_available() and ckbn.cuda_compiled()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device and ckbn built with its CUDA kernels"),
]

ops = torch.ops.ckbn
EPS = 1e-5
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last"]
SHAPES = {
    "odd-spatial": (4, 3, 5, 7),  # scalar loads
    "resnet": (8, 64, 14, 14),  # vector loads, one block per channel (fused backward)
    "odd-channels": (16, 37, 6, 6),  # channels_last: C not a multiple of the channel tile
    "cross-block": (64, 4, 128, 128),  # a channel split across blocks, partial results merged
    "batchnorm1d": (512, 100),
    "unit-spatial": (32, 48, 1, 1),  # contiguous, read as [N][C]
    "spatial-4": (8, 24, 14, 14),  # 16-bit NCHW: 8-byte loads (S % 8 != 0)
    "spatial-2": (8, 16, 5, 6),  # 16-bit NCHW: 4-byte loads, fp32 8-byte loads
    "wide-few-rows": (8, 2048, 7, 7),  # channels_last: many row splits, merged by the last block
    "many-channels": (4, 1500, 3, 3),  # more units than resident blocks: grid-stride loops
    # NCHW, S = 49: normalize and grad_input read the planes as one flat run (units enough for an
    # H200's 264 blocks), vectors across plane boundaries, a tail of numel % 8 elements.
    "flat": (127, 701, 7, 7),
}
# Output tolerance per dtype; statistics are float32 (float64 for float64 input).
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
}
STATS_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9)}


def stats_tol(dtype):
    return STATS_TOL.get(dtype, dict(rtol=1e-5, atol=1e-5))


def sums_tol(dtype, count):
    """Sums over `count` elements per channel: absolute error grows with sqrt(count)."""
    return dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * max(1.0, count**0.5))


def in_layout(x, layout):
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if layout == "channels_last" else x.contiguous()


def sample(shape, dtype, layout="contiguous", device="cuda", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    # Far from zero: a sum-of-squares variance would lose the spread.
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float64) * 3 + 5
    return in_layout(x.to(dtype), layout)


def params(channels, dtype, device="cuda", seed=1):
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.rand(channels, generator=gen, device=device, dtype=torch.float64).add(0.5)
    bias = torch.randn(channels, generator=gen, device=device, dtype=torch.float64)
    return weight.to(dtype), bias.to(dtype)


def assert_same_layout(got, want):
    if got.dim() > 1 and got.numel() > 1:
        assert got.stride() == want.stride()


@pytest.fixture(params=list(SHAPES.values()), ids=list(SHAPES))
def shape(request):
    return request.param


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


def test_batch_stats(shape, layout, dtype):
    x = sample(shape, dtype, layout)
    mean, invstd = ops.batch_stats(x, EPS)
    ref_mean, ref_invstd = ref.batch_stats(x, EPS)
    torch.testing.assert_close(mean, ref_mean, **stats_tol(dtype))
    torch.testing.assert_close(invstd, ref_invstd, **stats_tol(dtype))


@pytest.mark.parametrize("param_dtype", ["input", "float32", None])
def test_normalize(shape, layout, dtype, param_dtype):
    x = sample(shape, dtype, layout)
    mean, invstd = ref.batch_stats(x, EPS)
    weight = bias = None
    if param_dtype is not None:
        weight, bias = params(shape[1], dtype if param_dtype == "input" else torch.float32)
        if dtype == torch.float64:
            weight, bias = weight.double(), bias.double()
    out = ops.normalize(x, mean, invstd, weight, bias)
    want = ref.normalize(x, mean, invstd, weight, bias)
    torch.testing.assert_close(out, want, **TOL[dtype])
    assert_same_layout(out, want)


@pytest.mark.parametrize(
    "train,mask",
    [
        (True, (True, True, True)),
        (True, (True, False, False)),
        (False, (True, True, True)),
        (False, (False, True, True)),
        (True, (False, False, False)),
        (False, (False, False, False)),
    ],
    ids=["train", "train-input-only", "eval", "eval-params-only", "train-nothing", "eval-nothing"],
)
def test_backward(shape, layout, dtype, train, mask):
    x = sample(shape, dtype, layout)
    dy = sample(shape, dtype, seed=2)  # contiguous even when x is channels_last
    mean, invstd = ref.batch_stats(x, EPS)
    weight, _ = params(shape[1], dtype)
    got = ops.backward(dy, x, mean, invstd, weight, train, list(mask))
    want = ref.backward(dy, x, mean, invstd, weight, train, list(mask))
    torch.testing.assert_close(got[0], want[0], **TOL[dtype])
    assert_same_layout(got[0], want[0])
    count = x.numel() // shape[1]
    torch.testing.assert_close(got[1], want[1], **sums_tol(dtype, count))
    torch.testing.assert_close(got[2], want[2], **sums_tol(dtype, count))
    torch.cuda.synchronize()  # an out-of-bounds write (into an empty grad_input, say) raises here


def test_backward_halves(shape, layout, dtype):
    x = sample(shape, dtype, layout)
    dy = sample(shape, dtype, layout, seed=2)
    mean, invstd = ref.batch_stats(x, EPS)
    weight, _ = params(shape[1], dtype)
    count = x.numel() // shape[1]
    sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean)
    ref_sums = ref.backward_reduce(dy, x, mean)
    torch.testing.assert_close(sum_dy, ref_sums[0], **sums_tol(torch.float32, count))
    torch.testing.assert_close(sum_dy_xmu, ref_sums[1], **sums_tol(torch.float32, count))
    mean_dy, mean_dy_xmu = ref_sums[0] / count, ref_sums[1] / count
    got = ops.backward_elemt(dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu)
    want = ref.backward_elemt(dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("buffer_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_update_running_stats(buffer_dtype, momentum):
    channels = 700  # more channels than the kernel's threads
    positive, centered = params(channels, torch.float32, seed=3)
    stats = (centered, positive)  # mean, invstd
    buffers = [t.to(buffer_dtype) for t in reversed(params(channels, torch.float64, seed=4))]
    got = [b.clone() for b in buffers] + [torch.tensor(4, device="cuda")]
    want = [b.clone() for b in buffers] + [torch.tensor(4, device="cuda")]
    ops.update_running_stats(*got, *stats, momentum, EPS, 37)
    ref.update_running_stats(*want, *stats, momentum, EPS, 37)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[buffer_dtype if buffer_dtype != torch.float64 else torch.float32])


@pytest.mark.parametrize(
    "shape",
    [SHAPES["resnet"], SHAPES["cross-block"], SHAPES["batchnorm1d"]],
    ids=["resnet", "cross-block", "batchnorm1d"],
)
def test_training_step_matches_torch_float64(shape, layout):
    """A whole training step against F.batch_norm with autograd, everything in float64."""
    x = sample(shape, torch.float64, layout)
    dy = sample(shape, torch.float64, layout, seed=2)
    weight, bias = params(shape[1], torch.float64)
    running = [
        torch.zeros(shape[1], device="cuda", dtype=torch.float64),
        torch.ones(shape[1], device="cuda", dtype=torch.float64),
    ]
    torch_running = [t.clone() for t in running]

    mean, invstd = ops.batch_stats(x, EPS)
    y = ops.normalize(x, mean, invstd, weight, bias)
    ops.update_running_stats(*running, torch.tensor(0, device="cuda"), mean, invstd, 0.1, EPS, x.numel() // shape[1])
    dx, dw, db = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True])

    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    want_y = F.batch_norm(leaves[0], *torch_running, leaves[1], leaves[2], training=True, momentum=0.1, eps=EPS)
    want_dx, want_dw, want_db = torch.autograd.grad(want_y, leaves, dy)
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(dx, want_dx, **tol)
    torch.testing.assert_close(dw, want_dw, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(db, want_db, rtol=1e-9, atol=1e-7)
    for got, want in zip(running, torch_running):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("offset", [1, 2, 4], ids=lambda n: f"offset{n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_misaligned_storage(layout, dtype, offset):
    """Input and grad_output starting `offset` elements into their storage: loads only as wide as
    that alignment allows (down to scalars for one element)."""
    shape = (8, 16, 8, 8)
    base = sample(shape, dtype, layout)

    def shifted(t):
        storage = torch.empty(t.numel() + offset, device="cuda", dtype=dtype)
        order = t.movedim(1, -1) if layout == "channels_last" else t
        view = storage[offset:].view(order.shape)
        view.copy_(order)
        return view.movedim(-1, 1) if layout == "channels_last" else view

    x, dy = shifted(base), shifted(sample(shape, dtype, layout, seed=2))
    assert x.storage_offset() == offset
    mean, invstd = ops.batch_stats(x, EPS)
    ref_mean, ref_invstd = ref.batch_stats(x, EPS)
    torch.testing.assert_close(mean, ref_mean, **stats_tol(dtype))
    torch.testing.assert_close(invstd, ref_invstd, **stats_tol(dtype))
    torch.testing.assert_close(
        ops.normalize(x, mean, invstd, None, None), ref.normalize(x, mean, invstd, None, None), **TOL[dtype]
    )
    got = ops.backward(dy, x, mean, invstd, None, True, [True, True, True])
    want = ref.backward(dy, x, mean, invstd, None, True, [True, True, True])
    torch.testing.assert_close(got[0], want[0], **TOL[dtype])


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (4, 3, 0, 4)], ids=["empty-batch", "empty-spatial"])
def test_empty_input(shape, layout):
    x = sample(shape, torch.float32, layout)
    mean, invstd = ops.batch_stats(x, EPS)
    ref_mean, ref_invstd = ref.batch_stats(x, EPS)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(invstd, ref_invstd)
    assert ops.normalize(x, mean, invstd, None, None).shape == x.shape
    dx, dw, db = ops.backward(x, x, mean, invstd, torch.ones(3, device="cuda"), True, [True, True, True])
    assert dx.shape == x.shape
    torch.testing.assert_close(dw, torch.zeros(3, device="cuda"))
    torch.testing.assert_close(db, torch.zeros(3, device="cuda"))


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((16, 32, 12, 12), "contiguous"),
        # Split reductions: under capture each launch takes fresh arrival counters, zeroed by the graph.
        (SHAPES["cross-block"], "contiguous"),
        (SHAPES["wide-few-rows"], "channels_last"),
    ],
    ids=["whole-channels", "split-planes", "split-rows"],
)
def test_cuda_graph_training_step(shape, layout):
    """batch_stats, normalize, update_running_stats (momentum=None: 1/num_batches_tracked read on the
    device) and backward captured once and replayed on new data."""
    count = shape[0] * shape[2] * shape[3]
    static_x = sample(shape, torch.float32, layout)
    static_dy = sample(shape, torch.float32, layout, seed=2)
    weight, bias = params(shape[1], torch.float32)
    running = [
        torch.zeros(shape[1], device="cuda"),
        torch.ones(shape[1], device="cuda"),
        torch.tensor(0, device="cuda"),
    ]
    expected_running = [t.clone() for t in running]

    def step():
        mean, invstd = ops.batch_stats(static_x, EPS)
        y = ops.normalize(static_x, mean, invstd, weight, bias)
        ops.update_running_stats(*running, mean, invstd, None, EPS, count)
        grads = ops.backward(static_dy, static_x, mean, invstd, weight, True, [True, True, True])
        return (mean, invstd, y) + tuple(grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    for buffer, start in zip(running, expected_running):
        buffer.copy_(start)  # undo the warm-up's update

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mean, invstd, *outputs = step()

    for seed in (10, 11, 12):
        static_x.copy_(sample(shape, torch.float32, layout, seed=seed))
        static_dy.copy_(sample(shape, torch.float32, layout, seed=seed + 100))
        graph.replay()
        for got, want in zip((mean, invstd), ref.batch_stats(static_x, EPS)):
            torch.testing.assert_close(got, want, **stats_tol(torch.float32))
        # The rest from the replay's own statistics: grad_weight moves by sum(dy) times any rounding
        # difference in the mean, which at a million elements per channel exceeds the tolerance.
        want = (ref.normalize(static_x, mean, invstd, weight, bias),) + tuple(
            ref.backward(static_dy, static_x, mean, invstd, weight, True, [True, True, True])
        )
        ref.update_running_stats(*expected_running, mean, invstd, None, EPS, count)
        torch.cuda.synchronize()
        tols = [TOL[torch.float32]] * 2 + [sums_tol(torch.float32, count)] * 2
        for got, w, tol in zip(outputs, want, tols):
            torch.testing.assert_close(got, w, **tol)
        for got, w in zip(running, expected_running):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    assert running[2].item() == 3


@pytest.mark.parametrize("name, layout", [("cross-block", "contiguous"), ("wide-few-rows", "channels_last")])
def test_split_reductions_repeat_bitwise(name, layout):
    """The last block of a tile merges the partial states in a fixed order and resets its arrival
    counter: repeated launches on one stream, with a larger launch (a larger counter buffer) between
    them, and launches on two streams at once, all give the first launch's bits."""
    x = sample(SHAPES[name], torch.float16, layout)
    dy = sample(SHAPES[name], torch.float16, layout, seed=3)

    def reduce(x, dy):
        mean, invstd = ops.batch_stats(x, EPS)
        return mean, invstd, *ops.backward(dy, x, mean, invstd, None, True, [False, True, True])[1:]

    first = reduce(x, dy)
    torch.testing.assert_close(first[0], ref.batch_stats(x, EPS)[0], **stats_tol(torch.float16))
    wide = sample((4, 8192, 9, 9), torch.float16, "channels_last")
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(reduce(x, dy), first))
        ops.batch_stats(wide, EPS)
    streams = [torch.cuda.Stream() for _ in range(2)]
    results = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for stream in streams:
        with torch.cuda.stream(stream):
            results.append(reduce(x, dy))
    torch.cuda.synchronize()
    for got in results:
        assert all(torch.equal(a, b) for a, b in zip(got, first))


def test_non_default_stream(layout):
    shape = SHAPES["cross-block"]
    x = sample(shape, torch.float16, layout)
    expected = ops.batch_stats(x, EPS)
    expected_y = ops.normalize(x, *expected, None, None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Produced on the side stream just before use: the kernels must be ordered after it.
        x_side = x * 1
        mean, invstd = ops.batch_stats(x_side, EPS)
        y = ops.normalize(x_side, mean, invstd, None, None)
        dx = ops.backward(x_side, x_side, mean, invstd, None, True, [True, False, False])[0]
    stream.synchronize()
    torch.testing.assert_close(mean, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(invstd, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
    torch.testing.assert_close(
        dx, ref.backward(x, x, mean, invstd, None, True, [True, False, False])[0], **TOL[torch.float16]
    )


class TestDeviceMismatch:
    def test_running_stats_on_cpu(self):
        x = sample((4, 3, 5, 5), torch.float32)
        mean, invstd = ops.batch_stats(x, EPS)
        with pytest.raises(RuntimeError, match="running_mean"):
            ops.update_running_stats(torch.zeros(3), torch.ones(3), torch.tensor(0), mean, invstd, 0.1, EPS, 100)

    @pytest.mark.parametrize("name", ["mean", "invstd", "weight", "bias"])
    def test_normalize_vector_on_cpu(self, name):
        x = sample((4, 3, 5, 5), torch.float32)
        args = dict(zip(("mean", "invstd"), ops.batch_stats(x, EPS)))
        args["weight"], args["bias"] = params(3, torch.float32)
        args[name] = args[name].cpu()
        with pytest.raises(RuntimeError, match=f"expected {name} to be on the same device as input"):
            ops.normalize(x, args["mean"], args["invstd"], args["weight"], args["bias"])

    def test_grad_output_on_cpu(self):
        x = sample((4, 3, 5, 5), torch.float32)
        mean, invstd = ops.batch_stats(x, EPS)
        with pytest.raises(RuntimeError, match="grad_output"):
            ops.backward(x.cpu(), x, mean, invstd, None, True, [True, True, True])

    def test_input_on_cpu(self):
        x = sample((4, 3, 5, 5), torch.float32)
        mean, invstd = ops.batch_stats(x, EPS)
        with pytest.raises(RuntimeError, match="mean"):
            ops.normalize(x.cpu(), mean, invstd, None, None)

    @pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
    def test_two_gpus(self):
        x = sample((4, 3, 5, 5), torch.float32)
        mean, invstd = ops.batch_stats(x, EPS)
        with pytest.raises(RuntimeError, match="expected mean to be on the same device"):
            ops.normalize(x.to("cuda:1"), mean, invstd, None, None)


@pytest.mark.slow
def test_numel_beyond_int32(layout):
    """fp16 input of more than 2**31 elements (about 4.3 GB): offsets need 64 bits."""
    shape = (64, 32, 1024, 1025)
    numel = 64 * 32 * 1024 * 1025
    assert numel > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * numel * 2 + (1 << 30):
        pytest.skip("needs about 18 GB of free GPU memory")
    x = torch.empty(shape, device="cuda", dtype=torch.float16)
    for n in range(shape[0]):  # deterministic, per-channel offsets, generated in slices
        x[n].copy_(sample(shape[1:], torch.float16, seed=n) + torch.arange(shape[1], device="cuda").view(-1, 1, 1))
    x = in_layout(x, layout)
    mean, invstd = ops.batch_stats(x, EPS)
    # Float64 per-channel moments, accumulated slice by slice.
    total = torch.zeros(shape[1], device="cuda", dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for n in range(shape[0]):
        s = x[n].double()
        total += s.sum(dim=(1, 2))
        total_sq += (s * s).sum(dim=(1, 2))
    count = numel // shape[1]
    want_mean = total / count
    want_var = total_sq / count - want_mean**2
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(want_var + EPS), rtol=1e-4, atol=1e-4)

    y = ops.normalize(x, mean, invstd, None, None)
    for n in (0, shape[0] - 1):  # the last slice lies beyond element 2**31
        torch.testing.assert_close(
            y[n : n + 1], ref.normalize(x[n : n + 1], mean, invstd, None, None), **TOL[torch.float16]
        )
    del y
    dx = ops.backward(x, x, mean, invstd, None, False, [True, False, False])[0]
    torch.testing.assert_close(
        dx[-1:], ref.backward(x[-1:], x[-1:], mean, invstd, None, False, [True, False, False])[0], **TOL[torch.float16]
    )
