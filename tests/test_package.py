"""posae as a package: a non-editable install, in a fresh virtual environment, trains from
any directory, its configs read from inside the package."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_a_non_editable_install_composes_the_config_from_any_directory(tmp_path):
    """`pip install .` into a venv that reuses the torch already installed (system site
    packages, no dependency resolution), then `python -m posae.train --cfg job` from an
    empty folder: posae and its posae/conf/ come from the venv, not from this checkout."""
    source = tmp_path / "source"  # a copy, so that building leaves no files in the checkout
    shutil.copytree(REPO / "posae", source / "posae",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # this interpreter's packages (torch, ...) too, when it is itself a venv; after the
    # venv's own, so that the installed posae comes first
    (next(venv.glob("lib/python3*/site-packages")) / "reused.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n")
    # this interpreter's pip and setuptools build the wheel; it installs into the venv
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install",
                              "--quiet", "--no-deps", "--no-build-isolation", str(source)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import posae; print(posae.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    job = subprocess.run([python, "-m", "posae.train", "--cfg", "job", "variant=topk"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "name: topk" in job.stdout and "layer: 3" in job.stdout
    installed = list(venv.glob("lib/python3*/site-packages/posae/conf/variant/atr.yaml"))
    assert len(installed) == 1
