"""Shared fixtures: the devices every parametrized test runs on, and the backend check."""

import os

import pytest
import torch

import ckbn


def _cuda_usable() -> bool:
    return torch.cuda.is_available() and (ckbn.backend() == "reference" or ckbn.cuda_compiled())


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not _cuda_usable(), reason="needs a CUDA device and ckbn's CUDA kernels"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def ultralytics(tmp_path, monkeypatch):
    """The ultralytics package, offline, its settings kept out of the home directory."""
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))  # its settings file goes here, not to the home
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    return pytest.importorskip("ultralytics")


def pytest_report_header(config):
    return (
        f"ckbn {ckbn.__version__} from {os.path.dirname(ckbn.__file__)}; backend={ckbn.backend()}; "
        f"cuda kernels={'yes' if ckbn.cuda_compiled() else 'no'}; torch {torch.__version__}; "
        f"cpu capability={torch.backends.cpu.get_cpu_capability()}"
    )


def pytest_sessionstart(session):
    # CI sets this so that a build problem cannot quietly turn kernel tests into reference-vs-reference.
    if os.environ.get("CKBN_REQUIRE_EXTENSION", "0") not in ("", "0") and ckbn.backend() != "extension":
        pytest.exit("CKBN_REQUIRE_EXTENSION=1 but ckbn runs on the reference backend", returncode=3)
