"""The build backend (build_backend/ckbn_build.py) and what the build records about its torch.

The install paths themselves (`pip install .` isolated and not, `pip wheel .`, `python -m build`,
an editable install, and `pip install .` with no torch) are exercised by .ci/run, which builds in
fresh environments.
"""

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT

import ckbn
from ckbn import ops

ROOT = REPO_ROOT


@pytest.fixture
def build_backend():
    spec = importlib.util.spec_from_file_location("ckbn_build", ROOT / "build_backend" / "ckbn_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_backend_finds_the_torch_of_an_interpreter(build_backend, tmp_path, monkeypatch):
    # A PYTHONPATH (how pip masks the target environment in an isolated build) is ignored.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('the masking torch')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    site, version = build_backend._find_torch(sys.executable)
    assert Path(site) == Path(torch.__file__).resolve().parents[1]
    assert version == str(torch.__version__)


def test_backend_appends_the_target_torch_after_the_build_environment(build_backend, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises, as in an isolated build
    monkeypatch.setenv("CKBN_TORCH_PYTHON", sys.executable)
    site = str(Path(torch.__file__).resolve().parents[1])
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.realpath(p) != site])
    build_backend.make_torch_importable()
    assert sys.path[-1] == site


def test_backend_without_torch_stops_with_the_supported_versions(build_backend, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setenv("CKBN_TORCH_PYTHON", str(ROOT / "no-such-python"))
    with pytest.raises(SystemExit) as excinfo:
        build_backend.make_torch_importable()
    message = str(excinfo.value)
    assert "Install torch first" in message
    assert build_backend.SUPPORTED_TORCH in message and "2.11" in build_backend.SUPPORTED_TORCH


@pytest.mark.parametrize("under_pip", [False, True])
def test_backend_uses_an_activated_environment_only_outside_pip(build_backend, monkeypatch, under_pip):
    # The hook's interpreter has no torch (here: none at all); the activated environment has one.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delenv("CKBN_TORCH_PYTHON", raising=False)
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    monkeypatch.setenv("VIRTUAL_ENV", sys.prefix)
    monkeypatch.setattr(sys, "executable", str(ROOT / "no-such-python"))
    if under_pip:
        monkeypatch.setenv("PIP_BUILD_TRACKER", str(ROOT))
        with pytest.raises(SystemExit, match="Install torch first"):
            build_backend.make_torch_importable()
    else:
        monkeypatch.delenv("PIP_BUILD_TRACKER", raising=False)
        build_backend.make_torch_importable()  # python -m build, started from this environment


def test_supported_range_matches_the_package_requirement(build_backend):
    oldest = ".".join(map(str, build_backend.OLDEST_TORCH))
    assert f'"torch>={oldest}"' in (ROOT / "pyproject.toml").read_text()


def test_torch_mismatch_names_both_versions():
    assert ops.torch_mismatch(None, "2.14.1") is None
    assert ops.torch_mismatch("2.14.1+cu130", "2.14.1+cu130") is None
    message = ops.torch_mismatch("2.11.0+cu130", "2.14.1+cu130")
    assert "2.11.0+cu130" in message and "2.14.1+cu130" in message and "pip install ." in message


@pytest.mark.skipif(not ops.extension_loaded, reason="needs the compiled extension")
def test_extension_records_the_torch_it_was_built_against():
    assert ops.built_against() == str(torch.__version__)
    from ckbn import _build_info

    assert _build_info.CUDA_KERNELS == ckbn.cuda_compiled()


def test_installed_version_is_the_package_version():
    try:
        installed = importlib.metadata.version("ckbn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ckbn is imported from a source checkout and not installed")
    assert installed == ckbn.__version__
