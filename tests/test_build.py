"""The extension is compiled, uses OpenMP when it can, and still builds without it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import flashdecode
from flashdecode import _kernels

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_is_a_compiled_extension():
    assert Path(_kernels.__file__).suffix in (".so", ".pyd")
    assert flashdecode.max_threads() >= 1


def test_builds_and_runs_without_openmp(tmp_path):
    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "README.md").write_text("copy for a build test\n")
    shutil.copytree(ROOT / "flashdecode", tmp_path / "flashdecode",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    env = dict(os.environ, FLASHDECODE_NO_OPENMP="1")
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "WITHOUT OpenMP" in build.stderr
    check = (
        "import numpy as np, flashdecode as fd\n"
        "assert not fd.has_openmp() and fd.max_threads() == 1\n"
        "rng = np.random.default_rng(0)\n"
        "q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(2, 4, 16), (300, 2, 16), (300, 2, 16)])\n"
        "out = fd.flash_attention_forward(q, k, v, num_threads=2, split_size=50)\n"
        "ref, _ = fd.attention_reference(q, k, v)\n"
        "assert np.abs(out - ref).max() < 1e-5\n"
        "print(fd.__file__)\n"
    )
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(tmp_path) in run.stdout          # it imported the copy, not the installed package
