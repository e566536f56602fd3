"""ckbn's PEP 517 build backend: setuptools' own, compiling against the torch already installed.

The extension is compiled against torch's headers and libraries and loads only into that same
torch, so torch cannot be a build requirement: an isolated build would fetch a second copy, of
whatever version the index offers. Instead, each hook below first makes the torch of the
environment being installed into importable, appended after the build environment's own paths so
that the build's setuptools still wins. Under ``--no-build-isolation`` torch already imports and
nothing changes.

Where that torch is looked for, in order:

* ``CKBN_TORCH_PYTHON``: an interpreter named explicitly;
* the interpreter running the hook, with its isolation undone (``python -I`` ignores the
  ``PYTHONPATH`` with which pip masks the target's site-packages): pip runs the hooks with the
  interpreter it installs into;
* ``$VIRTUAL_ENV`` and ``$CONDA_PREFIX``: the environment an isolating frontend such as
  ``python -m build`` was started from, which builds in a fresh venv of its own. Not under pip
  (which sets ``PIP_BUILD_TRACKER`` for its builds): there the interpreter running the hook is the
  one installed into, and an activated environment may be another one, whose torch the installed
  ckbn would not load into.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Iterator, Optional, Tuple

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the hooks not wrapped below pass through)

# The torch releases ckbn is built and tested against; setup.py refuses an older one.
OLDEST_TORCH = (2, 11)
NEWEST_TESTED_TORCH = (2, 14)
SUPPORTED_TORCH = f"torch {OLDEST_TORCH[0]}.{OLDEST_TORCH[1]} to {NEWEST_TESTED_TORCH[0]}.{NEWEST_TESTED_TORCH[1]}"

_PROBE = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__))); print(torch.__version__)"


def _candidate_pythons() -> Iterator[str]:
    explicit = os.environ.get("CKBN_TORCH_PYTHON")
    if explicit:
        yield explicit
        return
    yield sys.executable
    if "PIP_BUILD_TRACKER" in os.environ:
        return
    for variable in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        prefix = os.environ.get(variable)
        if prefix:
            yield os.path.join(prefix, "Scripts" if os.name == "nt" else "bin", "python")


def _find_torch(python: str) -> Optional[Tuple[str, str]]:
    """(the directory holding the torch package, torch's version) as ``python`` sees them."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        probe = subprocess.run(
            [python, "-I", "-c", _PROBE], capture_output=True, text=True, env=environment, timeout=300
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = probe.stdout.split("\n")
    if probe.returncode != 0 or len(lines) < 2 or not os.path.isdir(os.path.join(lines[0], "torch")):
        return None
    return lines[0], lines[1]


def make_torch_importable() -> None:
    try:
        import torch  # noqa: F401  (--no-build-isolation, or a torch the build environment holds)

        return
    except ImportError:
        pass
    for python in _candidate_pythons():
        found = _find_torch(python)
        if found is not None:
            site, version = found
            if site not in sys.path:
                sys.path.append(site)
            print(f"ckbn: building against torch {version} from {site}", file=sys.stderr)
            return
    raise SystemExit(
        "ckbn: building needs torch, and none was found in the environment being installed into.\n"
        f"Install torch first ({SUPPORTED_TORCH} are supported), for example\n"
        "    pip install torch==2.14.1\n"
        "then run `pip install .` again. To name the interpreter whose torch to build against, set\n"
        "CKBN_TORCH_PYTHON=/path/to/python; or build with `pip install --no-build-isolation .`."
    )


def _with_torch(hook):
    @functools.wraps(hook)
    def wrapped(*args, **kwargs):
        make_torch_importable()
        return hook(*args, **kwargs)

    return wrapped


# Every hook runs setup.py, which imports torch to configure the extension.
get_requires_for_build_wheel = _with_torch(_setuptools.get_requires_for_build_wheel)
get_requires_for_build_sdist = _with_torch(_setuptools.get_requires_for_build_sdist)
get_requires_for_build_editable = _with_torch(_setuptools.get_requires_for_build_editable)
prepare_metadata_for_build_wheel = _with_torch(_setuptools.prepare_metadata_for_build_wheel)
prepare_metadata_for_build_editable = _with_torch(_setuptools.prepare_metadata_for_build_editable)
build_wheel = _with_torch(_setuptools.build_wheel)
build_sdist = _with_torch(_setuptools.build_sdist)
build_editable = _with_torch(_setuptools.build_editable)
