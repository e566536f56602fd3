"""ckbn.SyncBatchNorm on NCCL: a one-rank process group on cuda, against torch.nn.BatchNorm.

    python bench/sync_nccl_check.py                          # NCCL on cuda (bench/gpu_check.sh)
    python bench/sync_nccl_check.py --backend gloo --device cpu   # the same checks without a GPU

A one-rank SyncBatchNorm runs no collective, so besides the public module the checks force the
cross-process path onto the one-rank group: one all_gather in the forward and one all_reduce in the
backward per step, run by NCCL. Each case runs 3 training steps and one eval forward and compares
outputs, grad_input, parameter gradients and buffers with torch's BatchNorm on the same batch.
Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import socket
import sys

import torch
import torch.distributed as dist

import ckbn


class CrossProcessSyncBatchNorm(ckbn.SyncBatchNorm):
    """Takes the cross-process path in training even in a one-rank group, so that NCCL runs it."""

    def _sync_group(self):
        return dist.group.WORLD if self.training else None


F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
# (name, module class, torch class, input shape, input dtype, tolerance against float64)
CASES = [
    ("public module, fp64", ckbn.SyncBatchNorm, torch.nn.BatchNorm2d, (4, 8, 6, 6), F64, 1e-10),
    ("cross-process path, fp64", CrossProcessSyncBatchNorm, torch.nn.BatchNorm2d, (4, 8, 6, 6), F64, 1e-10),
    ("cross-process path, C > one frame", CrossProcessSyncBatchNorm, torch.nn.BatchNorm1d, (16, 2050), F64, 1e-10),
    ("cross-process path, fp32", CrossProcessSyncBatchNorm, torch.nn.BatchNorm3d, (2, 5, 4, 6, 3), F32, 1e-4),
    ("cross-process path, bf16 input", CrossProcessSyncBatchNorm, torch.nn.BatchNorm2d, (4, 8, 6, 6), BF16, 5e-2),
]


def check(module_cls, torch_cls, shape, dtype, tol, device) -> None:
    """3 training steps and an eval forward; fp32 parameters for fp32 and bf16 input (AMP's layout)."""
    generator = torch.Generator().manual_seed(0)
    oracle = torch_cls(shape[1], device=device, dtype=F64)
    with torch.no_grad():
        oracle.weight.copy_(torch.rand(shape[1], generator=generator) + 0.5)
        oracle.bias.copy_(torch.rand(shape[1], generator=generator) - 0.5)
    ours = module_cls(shape[1], device=device, dtype=F64 if dtype == F64 else F32)
    ours.load_state_dict(oracle.state_dict())

    def assert_close(actual, expected, what):
        message = lambda m: f"{what}: {m}"  # noqa: E731
        torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol, atol=tol, msg=message)

    for step in range(4):
        ours.train(step < 3)
        oracle.train(step < 3)
        x = (torch.randn(shape, generator=generator) * (step + 1) + step).to(device)
        grad_out = torch.randn(shape, generator=generator).to(device, dtype)
        x_ours = x.to(dtype).requires_grad_()
        x_oracle = x_ours.detach().double().requires_grad_()
        y_ours, y_oracle = ours(x_ours), oracle(x_oracle)
        y_ours.backward(grad_out)
        y_oracle.backward(grad_out.double())
        assert_close(y_ours, y_oracle, f"step {step} output")
        assert_close(x_ours.grad, x_oracle.grad, f"step {step} grad_input")
        for name in ("weight", "bias"):
            assert_close(getattr(ours, name).grad, getattr(oracle, name).grad, f"step {step} {name}.grad")
        ours.zero_grad()
        oracle.zero_grad()
        for key, value in oracle.state_dict().items():
            assert_close(ours.state_dict()[key], value, f"step {step} {key}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="nccl")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    print(f"ckbn {ckbn.__version__} backend={ckbn.backend()} | torch.distributed {args.backend} on {device}")
    failures = 0
    try:
        for name, module_cls, torch_cls, shape, dtype, tol in CASES:
            try:
                check(module_cls, torch_cls, shape, dtype, tol, device)
                print(f"ok    {name}")
            except AssertionError as exc:
                failures += 1
                print(f"FAIL  {name}: {exc}")
    finally:
        dist.destroy_process_group()
    print("sync_nccl_check: " + ("all passed" if not failures else f"{failures} failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
