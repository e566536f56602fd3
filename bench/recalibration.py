"""ckbn.recalibrate against torch.optim.swa_utils.update_bn on torchvision's ResNet-18.

    python bench/recalibration.py [--batches 8] [--batch-size 8] [--size 64]

Both recalibrate the same converted model over the same batches (synthetic images whose brightness
and contrast vary from batch to batch, as augmentation makes them). The truth is each layer's
population statistics: its inputs captured in float64 over all batches and concatenated (the oracle
of tests/models/test_recalibrate.py). Printed: per-layer relative error of running_var and running_mean
(median and worst over the 20 layers), and how far each model's eval output is from the truth's.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
import torchvision

import ckbn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_recalibrate import batch_norm_layers, population_statistics  # noqa: E402  (the oracle)


def relative_errors(model, truth, which):
    index = {"running_mean": 0, "running_var": 1}[which]
    errors = []
    for name, layer in batch_norm_layers(model).items():
        expected = truth[name][index]
        scale = expected.abs().max() if which == "running_var" else truth[name][1].sqrt().max()
        errors.append(((getattr(layer, which).double() - expected).abs().max() / scale).item())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ckbn.convert_model(torchvision.models.resnet18(num_classes=10)).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randn(args.batch_size, 3, args.size, args.size, generator=generator)
        * (0.5 + torch.rand(1, generator=generator))
        + torch.randn(1, generator=generator)
        for _ in range(args.batches)
    ]
    truth = population_statistics(model, batches)
    exact = copy.deepcopy(model)
    for name, layer in batch_norm_layers(exact).items():
        layer.running_mean.copy_(truth[name][0])
        layer.running_var.copy_(truth[name][1])

    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    ckbn.recalibrate(ours, batches)
    torch.optim.swa_utils.update_bn(batches, theirs)

    probe = torch.cat(batches[:2])
    with torch.no_grad():
        reference = exact(probe)
        print(
            f"ResNet-18, {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, "
            f"torch {torch.__version__}, "
            f"ckbn backend {ckbn.backend()}\n"
        )
        print(
            "| recalibration | running_var rel. error, median / worst layer "
            "| running_mean error, median / worst | eval output rel. error |"
        )
        print("|---|---|---|---|")
        for label, candidate in (("`ckbn.recalibrate`", ours), ("`torch.optim.swa_utils.update_bn`", theirs)):
            var, mean = (
                relative_errors(candidate, truth, "running_var"),
                relative_errors(candidate, truth, "running_mean"),
            )
            output = ((candidate(probe) - reference).norm() / reference.norm()).item()
            print(
                f"| {label} | {statistics.median(var):.1e} / {max(var):.1e} "
                f"| {statistics.median(mean):.1e} / {max(mean):.1e} | {output:.1e} |"
            )


if __name__ == "__main__":
    main()
