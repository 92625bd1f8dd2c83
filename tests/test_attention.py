"""flash_attention_forward, both backends, against chapter 01's float64 reference."""

import numpy as np
import pytest
from conftest import BACKENDS, rel_err

from flashdecode import attention_reference, flash_attention_forward
from flashdecode.api import TILE

HEAD_DIMS = [1, 3, 64, 80, 128, 256]
GROUPS = [1, 2, 3, 4, 5, 6, 7, 8]
EDGE_LENGTHS = [1, TILE - 1, TILE, TILE + 1]


def random_qkv(rng, q_len, num_heads, kv_len, num_kv_heads, head_dim, spread=1.0):
    q = (rng.standard_normal((q_len, num_heads, head_dim)) * spread).astype(np.float32)
    k = rng.standard_normal((kv_len, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((kv_len, num_kv_heads, head_dim)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
def test_matches_reference_decode(rng, backend, head_dim, group):
    num_kv_heads = 2
    for kv_len in EDGE_LENGTHS:
        q, k, v = random_qkv(rng, 1, group * num_kv_heads, kv_len, num_kv_heads, head_dim)
        out, lse = flash_attention_forward(q, k, v, return_lse=True, backend=backend)
        ref, ref_lse = attention_reference(q, k, v)
        assert out.dtype == np.float32 and out.shape == q.shape and lse.shape == q.shape[:2]
        assert rel_err(out, ref) < 1e-4, kv_len
        assert rel_err(lse, ref_lse) < 1e-4, kv_len


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (3, 3), (5, 64), (17, 65), (64, 200), (1, 129)])
@pytest.mark.parametrize("group", [1, 5, 7])
def test_causal_bottom_right(rng, backend, q_len, kv_len, group):
    q, k, v = random_qkv(rng, q_len, group, kv_len, 1, 32)
    out, lse = flash_attention_forward(q, k, v, causal=True, return_lse=True, backend=backend)
    ref, ref_lse = attention_reference(q, k, v, causal=True)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4
    # the last query row sees every key: the same as a non-causal call for that row
    last = flash_attention_forward(q[-1:], k, v, backend=backend)
    assert rel_err(out[-1:], last) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(rng, backend):
    q, k, v = random_qkv(rng, 2, 4, 300, 2, 64, spread=200.0)  # scores in the thousands
    out, lse = flash_attention_forward(q, k, v, return_lse=True, backend=backend)
    ref, ref_lse = attention_reference(q, k, v)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


@pytest.mark.parametrize("split_size", [1, 2, 63, 64, 100, 1000])
def test_forced_split_matches_unsplit(rng, split_size):
    q, k, v = random_qkv(rng, 1, 8, 1000, 1, 64)
    out, lse = flash_attention_forward(q, k, v, return_lse=True, split_size=split_size)
    ref, ref_lse = attention_reference(q, k, v)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


def test_backends_agree(rng):
    q, k, v = random_qkv(rng, 9, 12, 500, 3, 80)
    for causal in (False, True):
        fast, fast_lse = flash_attention_forward(q, k, v, causal=causal, return_lse=True)
        slow, slow_lse = flash_attention_forward(q, k, v, causal=causal, return_lse=True, backend="numpy")
        assert rel_err(fast, slow) < 1e-5 and rel_err(fast_lse, slow_lse) < 1e-5


def test_empty_cache_and_empty_queries(rng):
    q, k, v = random_qkv(rng, 2, 4, 0, 2, 8)
    out, lse = flash_attention_forward(q, k, v, return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)
    q, k, v = random_qkv(rng, 0, 4, 10, 2, 8)
    out, lse = flash_attention_forward(q, k, v, return_lse=True)
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


def test_default_scale_and_explicit_scale(rng):
    q, k, v = random_qkv(rng, 1, 4, 50, 4, 16)
    assert rel_err(flash_attention_forward(q, k, v), flash_attention_forward(q, k, v, 0.25)) < 1e-6
    ref, _ = attention_reference(q, k, v, softmax_scale=0.9)
    assert rel_err(flash_attention_forward(q, k, v, 0.9), ref) < 1e-4


@pytest.mark.parametrize("layout", ["float16", "float64", ">f4", ">f2", "fortran", "strided", "reversed", "readonly"])
def test_odd_but_valid_inputs(rng, layout):
    q, k, v = random_qkv(rng, 3, 6, 77, 2, 32)
    if layout in ("float16", "float64", ">f4", ">f2"):  # ">f4": float32 by name, bytes in the other order
        q, k, v = (a.astype(layout) for a in (q, k, v))
    elif layout == "fortran":
        q, k, v = (np.asfortranarray(a) for a in (q, k, v))
    elif layout == "strided":
        big_k = np.zeros((77, 2, 64), np.float32)
        big_k[:, :, ::2] = k
        k = big_k[:, :, ::2]
        v = np.repeat(v, 2, axis=0)[::2]
    elif layout == "reversed":
        k, v = k[::-1].copy()[::-1], v[::-1].copy()[::-1]
    else:
        for a in (q, k, v):
            a.flags.writeable = False
    before = [a.copy() for a in (q, k, v)]
    out = flash_attention_forward(q, k, v, causal=True)
    ref, _ = attention_reference(q, k, v, causal=True)
    assert rel_err(out, ref) < (2e-3 if layout in ("float16", ">f2") else 1e-4)
    for a, b in zip((q, k, v), before):
        assert np.array_equal(a, b)  # inputs are never written to


def test_nan_stays_in_its_row(rng):
    q, k, v = random_qkv(rng, 3, 2, 10, 1, 8)
    q[1, 0, 0] = np.nan
    out = flash_attention_forward(q, k, v)
    assert np.isnan(out[1, 0]).all()
    assert np.isfinite(out[0]).all() and np.isfinite(out[2]).all() and np.isfinite(out[1, 1]).all()
