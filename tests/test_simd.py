"""Every tile kernel and SIMD micro-kernel through its Python handle, against numpy and against its plain twin;
the C header on its own; the plan's column names shared by Python and the kernel."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import TILE_KERNELS

from flashdecode import _kernels
from flashdecode.api import ITEM_COLUMNS, MERGE_COLUMNS, kv_row

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = range(0, 41)
GROUPS = range(1, 9)


def kv_of_heads(num_kv_heads, group):
    return np.repeat(np.arange(num_kv_heads), group)  # query head -> the kv head it reads


@pytest.mark.parametrize("kernels", TILE_KERNELS)
@pytest.mark.parametrize("group", GROUPS)
def test_tile_scores_and_update_match_numpy(kernels, group):
    rng = np.random.default_rng(group)
    for n in LENGTHS:
        head_dim = 1 + (n * 7) % 40  # 1..40: every tail length of the 8-wide loops
        q = rng.standard_normal((2 * group, head_dim)).astype(np.float32)
        keys, values = rng.standard_normal((2, n, 2, head_dim)).astype(np.float32)
        heads = kv_of_heads(2, group)
        scores = _kernels.tile_scores(q, keys, kernels)
        expected = np.einsum("hd,nhd->hn", q.astype(np.float64), keys[:, heads])
        assert scores.shape == (2 * group, n) and np.allclose(scores, expected, rtol=1e-5, atol=1e-5)
        acc = rng.standard_normal((2 * group, head_dim)).astype(np.float32)
        expected = acc + np.einsum("hn,nhd->hd", scores.astype(np.float64), values[:, heads])
        _kernels.tile_update(acc, scores, values, kernels)
        assert np.allclose(acc, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group", GROUPS)
def test_simd_tile_kernels_match_their_plain_twins(group):
    rng = np.random.default_rng(100 + group)
    for n in LENGTHS:
        q = rng.standard_normal((3 * group, 64)).astype(np.float32)
        keys, values = rng.standard_normal((2, n, 3, 64)).astype(np.float32)
        plain, simd = (_kernels.tile_scores(q, keys, kernels) for kernels in ("cython", "simd"))
        scale = max(np.abs(plain).max(initial=0.0), 1e-30)
        assert np.abs(plain - simd).max(initial=0.0) <= 1e-5 * scale
        acc = {kernels: np.zeros((3 * group, 64), np.float32) for kernels in ("cython", "simd")}
        for kernels in acc:
            _kernels.tile_update(acc[kernels], plain, values, kernels)
        scale = max(np.abs(acc["cython"]).max(initial=0.0), 1e-30)
        assert np.abs(acc["cython"] - acc["simd"]).max(initial=0.0) <= 1e-5 * scale


@pytest.mark.parametrize("kernels", TILE_KERNELS)
def test_tile_max_lets_nan_through(kernels):
    for n in LENGTHS:
        s = np.random.default_rng(n).standard_normal(n).astype(np.float32)
        assert _kernels.tile_max(s, kernels) == (s.max() if n else -np.inf)
        if n:
            s[n // 2] = np.nan
            assert np.isnan(_kernels.tile_max(s, kernels))


@pytest.mark.parametrize("head_dim", range(0, 41))
def test_micro_kernels_match_numpy(head_dim):
    rng = np.random.default_rng(head_dim)
    q4, k4 = rng.standard_normal((2, 4, head_dim)).astype(np.float32)
    assert np.allclose(_kernels.dot4(q4, k4), np.einsum("rd,rd->r", q4, k4), rtol=1e-5, atol=1e-5)
    shared = np.stack([k4[0]] * 4)  # four heads sharing one key row
    assert np.allclose(_kernels.dot4(q4, shared), q4 @ k4[0], rtol=1e-5, atol=1e-5)
    k3 = rng.standard_normal((3, head_dim)).astype(np.float32)
    assert np.allclose(_kernels.dot4x3(q4, k3), k3 @ q4.T, rtol=1e-5, atol=1e-5)
    y, p, x = rng.standard_normal(head_dim).astype(np.float32), rng.standard_normal(4).astype(np.float32), k4
    expected = y + p @ x
    _kernels.axpy4(y, p, x)
    assert np.allclose(y, expected, rtol=1e-5, atol=1e-5)
    y4, p44 = rng.standard_normal((4, head_dim)).astype(np.float32), rng.standard_normal((4, 4)).astype(np.float32)
    expected = y4 + p44 @ x
    _kernels.axpy4x4(y4, p44, x)
    assert np.allclose(y4, expected, rtol=1e-5, atol=1e-5)


def test_micro_kernel_handles_reject_wrong_shapes():
    with pytest.raises(ValueError, match="dot4 takes"):
        _kernels.dot4(np.zeros((3, 8), np.float32), np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        _kernels.tile_update(
            np.zeros((4, 8), np.float32), np.zeros((4, 2), np.float32), np.zeros((3, 1, 8), np.float32)
        )


@pytest.mark.parametrize("dtype", [">f4", ">f2", "int16"])
def test_tile_handles_refuse_arrays_they_cannot_read(dtype):
    # a byte-swapped float32 is float32 by name; read as native bytes it would give garbage
    keys = np.ones((3, 1, 8), dtype)
    with pytest.raises(ValueError, match="byte order"):
        _kernels.tile_scores(np.ones((1, 8), np.float32), keys, "simd")


def test_unknown_kernel_set_is_a_key_error():
    with pytest.raises(KeyError):
        _kernels.exp_sub(np.zeros(3, np.float32), 0.0, "avx9000")


def test_plan_columns_and_row_columns_agree_with_the_kernel():
    assert _kernels.ITEM_COLUMNS == ITEM_COLUMNS and _kernels.MERGE_COLUMNS == MERGE_COLUMNS
    k = np.zeros((5, 2, 8), np.float32)
    assert len(kv_row(k, k)) == len(_kernels.ROW_COLUMNS)
    assert dict(zip(_kernels.ROW_COLUMNS, kv_row(k, k)))["k_token_stride"] == 16


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("flags", [[], ["-DFD_NO_CLONES"]])
def test_header_compiles_on_its_own(tmp_path, flags):
    """_simd.h and _openmp.h are plain C: a translation unit of their own builds without warnings."""
    source = tmp_path / "alone.c"
    source.write_text('#include "_openmp.h"\n#include "_simd.h"\nint main(void) { return 0; }\n')
    build = subprocess.run(
        [
            "gcc",
            "-std=gnu11",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unused-function",
            "-fopenmp-simd",
            "-I",
            str(ROOT / "flashdecode"),
            *flags,
            str(source),
            "-o",
            str(tmp_path / "alone"),
            "-lm",
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
