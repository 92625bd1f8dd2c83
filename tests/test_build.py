"""The extension is compiled, uses OpenMP when it can, and still builds without it, and without the SIMD clones."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import flashdecode
from flashdecode import _kernels

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_is_a_compiled_extension():
    assert Path(_kernels.__file__).suffix in (".so", ".pyd")
    assert flashdecode.max_threads() >= 1


def build_copy(tmp_path, env_flag):
    """Build a copy of the package with one FLASHDECODE_* switch set; returns the build's stderr."""
    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "README.md").write_text("copy for a build test\n")
    shutil.copytree(
        ROOT / "flashdecode", tmp_path / "flashdecode", ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__")
    )
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tmp_path,
        env=dict(os.environ, **{env_flag: "1"}),
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    return build.stderr


def run_copy(tmp_path, checks):
    """Run a decode step with every backend from the built copy, after `checks`; it must match float64."""
    script = (
        "import numpy as np, flashdecode as fd\n" + checks + "rng = np.random.default_rng(0)\n"
        "q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(2, 8, 40), (300, 2, 40), (300, 2, 40)])\n"
        "ref, _ = fd.attention_reference(q, k, v)\n"
        "for backend in ('cython', 'simd', 'auto'):\n"
        "    out = fd.flash_attention_forward(q, k, v, num_threads=2, split_size=50, backend=backend)\n"
        "    assert np.abs(out - ref).max() < 1e-5, backend\n"
        "print(fd.__file__)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(tmp_path) in run.stdout  # it imported the copy, not the installed package


def test_builds_and_runs_without_openmp(tmp_path):
    assert "WITHOUT OpenMP" in build_copy(tmp_path, "FLASHDECODE_NO_OPENMP")
    run_copy(tmp_path, "assert not fd.has_openmp() and fd.max_threads() == 1\n")


def test_builds_and_runs_without_simd_clones(tmp_path):
    """FLASHDECODE_NO_CLONES=1: the SIMD tile kernels in their plain x86-64 (SSE2) version only."""
    build_copy(tmp_path, "FLASHDECODE_NO_CLONES")
    run_copy(tmp_path, "assert 'simd' in fd._kernels.KERNEL_SETS\n")
