"""The package as a user gets it: a wheel built from the sdist, installed into a fresh virtual environment.

`python -m build` (what `make dist` runs) builds the sdist from this checkout, then the wheel from that sdist in
an isolated build environment, so the wheel proves the sdist carries the kernel's sources and pyproject.toml's
build requirements suffice. The wheel goes into a new venv (no --system-site-packages) under the test's temporary
folder; a subprocess started there, from a working directory outside the checkout and in isolated mode (-I: no
PYTHONPATH, no script or cwd on sys.path), runs one ragged decode step with the compiled kernel
(backend="auto" and "cython", never the numpy backend). The test checks that the imported package and its `_kernels`
extension are the installed copies, outside the checkout, and compares the answer with a float64 reference
computed here in plain numpy.

Marked `wheel`. It needs PyPI (the build requirements and numpy for the fresh venv) like `make build` does.
It takes about half a minute.
"""

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parent.parent

# the compiled backends the installed package is run with: the default ("auto": the fastest kernel built) and
# the plain Cython tile kernels; never "numpy"
BACKENDS = ("auto", "cython")
# `python -c DECODE_STEP OUT.npz BACKEND...` inside the fresh venv: one decode step of a ragged batch (GQA, an
# empty slot, a long slot split in parts) with each backend named
DECODE_STEP = """
import json, sys
import numpy as np
import flashdecode
from flashdecode import KvCache, batched_flash_attention, _kernels

rng = np.random.default_rng(7)
lengths = [300, 0, 17, 1000]
cache = KvCache(num_slots=4, capacity=1024, num_kv_heads=2, head_dim=64)
keys, values = [], []
for slot, n in enumerate(lengths):
    k = rng.standard_normal((n, 2, 64)).astype(np.float32)
    v = rng.standard_normal((n, 2, 64)).astype(np.float32)
    if n:
        cache.append(slot, k, v)
    keys.append(k)
    values.append(v)
q = rng.standard_normal((4, 8, 64)).astype(np.float32)
results = {}
for backend in sys.argv[2:]:
    out, lse = batched_flash_attention(q, cache.view([0, 1, 2, 3]), return_lse=True, backend=backend,
                                       num_threads=2, split_size=256)
    results[f"out_{backend}"], results[f"lse_{backend}"] = out, lse
np.savez(sys.argv[1], q=q, lengths=np.array(lengths), **results,
         **{f"k{b}": k for b, k in enumerate(keys)}, **{f"v{b}": v for b, v in enumerate(values)})
print(json.dumps({"package": flashdecode.__file__, "kernels": _kernels.__file__, "prefix": sys.prefix,
                  "max_threads": flashdecode.max_threads()}))
"""


def reference(q, keys, values):
    """softmax(q·kᵀ/√D)·v per slot and head in float64; query head h reads kv head h // (H / Hkv)."""
    q = q.astype(np.float64)
    batch, heads, head_dim = q.shape
    out, lse = np.zeros((batch, heads, head_dim)), np.full((batch, heads), -np.inf)
    for b, (k, v) in enumerate(zip(keys, values)):
        if len(k) == 0:
            continue  # an empty slot: zeros and lse -inf
        group = heads // k.shape[1]
        k, v = (np.repeat(a.astype(np.float64), group, axis=1) for a in (k, v))  # (L, H, D)
        scores = np.einsum("hd,lhd->hl", q[b], k) / np.sqrt(head_dim)
        top = scores.max(axis=1, keepdims=True)
        weights = np.exp(scores - top)
        total = weights.sum(axis=1, keepdims=True)
        out[b] = np.einsum("hl,lhd->hd", weights / total, v)
        lse[b] = (np.log(total) + top)[:, 0]
    return out, lse


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def test_wheel_from_sdist_installs_and_runs_the_compiled_kernel_outside_the_checkout(tmp_path):
    assert not tmp_path.resolve().is_relative_to(ROOT), "the temporary folder must be outside the checkout"
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)])

    (sdist,) = dist.glob("flashdecode-*.tar.gz")
    (wheel,) = dist.glob("flashdecode-*.whl")
    with tarfile.open(sdist) as archive:
        sdist_names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    sources = ["setup.py", "flashdecode/_kernels.pyx"] + [f"flashdecode/{h.name}" for h in ROOT.glob("flashdecode/*.h")]
    missing = [name for name in sources if name not in sdist_names]
    assert not missing, f"the sdist lacks the kernel's sources {missing}: {sdist_names}"
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = archive.namelist()
    assert "none-any" not in wheel.name, f"{wheel.name} is a pure-Python wheel: the kernel was not compiled"
    extensions = [name for name in wheel_names if name.startswith("flashdecode/_kernels.") and name.endswith(".so")]
    assert len(extensions) == 1, wheel_names

    # everything from here runs outside the checkout and without this interpreter's environment: a PYTHONPATH
    # reaching the checkout would let pip find flashdecode "already installed" there and skip the wheel
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=elsewhere, env=env)
    python = venv / "bin" / "python"
    _run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        cwd=elsewhere,
        env=env,
    )
    result = _run([str(python), "-I", "-c", DECODE_STEP, str(tmp_path / "step.npz"), *BACKENDS], cwd=elsewhere, env=env)
    where = json.loads(result.stdout.strip().splitlines()[-1])

    site_packages = Path(where["prefix"]).resolve()
    assert site_packages == venv.resolve(), where
    for name in ("package", "kernels"):
        path = Path(where[name]).resolve()
        assert path.is_relative_to(site_packages), f"{name} imported from {path}, not from the fresh venv"
        assert not path.is_relative_to(ROOT), f"{name} imported from the checkout: {path}"
    kernels = Path(where["kernels"])
    assert kernels.suffix == ".so" and kernels.name.startswith("_kernels."), kernels
    assert where["max_threads"] >= 1

    step = np.load(tmp_path / "step.npz")
    lengths = step["lengths"]
    keys = [step[f"k{b}"] for b in range(len(lengths))]
    values = [step[f"v{b}"] for b in range(len(lengths))]
    out_ref, lse_ref = reference(step["q"], keys, values)
    live = np.isfinite(lse_ref)
    for backend in BACKENDS:
        out, lse = step[f"out_{backend}"], step[f"lse_{backend}"]
        assert out.dtype == np.float32 and out.shape == out_ref.shape, (backend, out.dtype, out.shape)
        assert np.array_equal(out[1], np.zeros_like(out[1])) and np.all(lse[1] == -np.inf), backend  # empty slot
        error = np.abs(out - out_ref).max() / np.abs(out_ref).max()
        assert error < 1e-5, f"installed kernel ({backend}) differs from the float64 reference: {error:.2e}"
        assert np.array_equal(live, np.isfinite(lse)), backend
        assert np.abs(lse[live] - lse_ref[live]).max() < 1e-4, backend
