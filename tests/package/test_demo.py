"""The demo (python -m ckbn) and the models benchmark, run in-process with tiny settings."""

import importlib.util
import json

import pytest
from conftest import DEVICES
from helpers import REPO_ROOT

import ckbn
from ckbn.__main__ import main as demo

STEPS = 3
FIELDS = {
    "name",
    "running_stats_max_deviation",
    "num_batches_tracked",
    "eval_loss",
    "eval_accuracy",
    "saved_bytes",
    "ms_per_step",
}
REFERENCE, TORCH_BN, TORCH_CHECKPOINT_CKBN_BN, CKBN_CHECKPOINT = range(4)


@pytest.fixture(scope="module", params=DEVICES)
def configs(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.json"
    argv = ["--steps", str(STEPS), "--batch-size", "8", "--device", request.param, "--json", str(path)]
    assert demo(argv) == 0
    report = json.loads(path.read_text())
    assert report["ckbn_backend"] == ckbn.backend()
    assert (report["steps"], report["device"]) == (STEPS, request.param)
    return report["configs"]


def test_every_configuration_reports_every_field(configs):
    assert len(configs) == 4
    for config in configs:
        assert set(config) >= FIELDS
        assert config["saved_bytes"] > 0 and config["ms_per_step"] > 0
        assert 0 <= config["eval_accuracy"] <= 1


def test_reference_counts_each_batch_once(configs):
    assert configs[REFERENCE]["num_batches_tracked"] == STEPS
    assert configs[REFERENCE]["running_stats_max_deviation"] == 0


def test_torch_batchnorm_counts_each_checkpointed_batch_twice(configs):
    assert configs[TORCH_BN]["num_batches_tracked"] == 2 * STEPS
    # Momentum 0.1 applied twice per step moves the running means by ~0.1 of a batch mean; rounding
    # differences between torch's and ckbn's arithmetic stay near 1e-7.
    assert configs[TORCH_BN]["running_stats_max_deviation"] > 1e-3


@pytest.mark.parametrize("index", [TORCH_CHECKPOINT_CKBN_BN, CKBN_CHECKPOINT])
def test_ckbn_batchnorm_matches_reference(configs, index):
    assert configs[index]["num_batches_tracked"] == STEPS
    assert configs[index]["running_stats_max_deviation"] <= 1e-5
    assert configs[index]["eval_loss"] == pytest.approx(configs[REFERENCE]["eval_loss"], abs=1e-5)


def test_checkpointed_configurations_save_less(configs):
    for config in configs[1:]:
        assert config["saved_bytes"] < configs[REFERENCE]["saved_bytes"] / 2


def test_json_to_stdout_leaves_the_table_on_stderr(capsys):
    assert demo(["--steps", "1", "--batch-size", "4", "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["configs"]) == 4
    assert f"backend: {ckbn.backend()}" in err and "| configuration |" in err


def test_models_benchmark_quick(tmp_path):
    pytest.importorskip("torchvision")
    path = REPO_ROOT / "bench" / "models.py"
    spec = importlib.util.spec_from_file_location("bench_models", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    outputs = {flag: tmp_path / f"models.{flag[2:]}" for flag in ("--json", "--md", "--plot")}
    argv = ["--quick", "--device", "cpu"] + [str(item) for pair in outputs.items() for item in pair]
    assert bench.main(argv) == 0

    rows = json.loads(outputs["--json"].read_text())["rows"]
    assert {(row["model"], row["variant"]) for row in rows} == {
        (model, variant.name) for model in bench.MODELS for variant in bench.VARIANTS
    }
    for row in rows:
        assert row["time_ms"] > 0 and row["memory_bytes"] > 0
        if row["variant"] == bench.BASELINE:
            assert row["time_ratio"] == row["memory_ratio"] == 1
    assert "| resnet18 | ckbn |" in outputs["--md"].read_text()


def test_models_summary_of_runs(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    root = REPO_ROOT
    monkeypatch.syspath_prepend(str(root))
    from bench import models, summarize_models

    runs = []
    for index, slow in enumerate((1.0, 2.0, 3.0)):
        rows = [
            {
                "model": "m",
                "variant": variant.name,
                "time_ms": 10.0 * (1 + slow * i),
                "held_bytes": 100 - i,
                "time_vs_unchecked": 1 + slow * i,
                "time_ratio": 1.0,
                "held_vs_unchecked": 1.0,
                "backward_peak_vs_unchecked": 1.0,
            }
            for i, variant in enumerate(models.VARIANTS)
        ]
        path = tmp_path / f"run{index}.json"
        path.write_text(json.dumps({"machine": "CPU", "torch": "x", "ckbn_backend": "b", "time": "t", "rows": rows}))
        runs.append(str(path))
    assert summarize_models.main(runs + ["--md", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")]) == 0
    table = (tmp_path / "s.md").read_text()
    # The second variant's time / unchecked over the three runs: 2, 3, 4: median 3, range 2-4.
    assert f"| m | {models.VARIANTS[1].name} | 3 | 30 | 3.00 (2.00–4.00) |" in table
    assert len([line for line in table.splitlines() if line.startswith("| m |")]) == len(models.VARIANTS)
