"""Split-KV (Flash-Decoding): the merge rule, the split path of the kernel, and the automatic plan."""

import numpy as np
import pytest
from conftest import random_view, rel_err

from flashdecode import attention_reference, batched_flash_attention, flash_attention_forward, merge_states
from flashdecode.api import MIN_SPLIT, plan_work


def chunk_bounds(total, sizes):
    """[(start, stop)] for consecutive chunks of the given sizes (the last one takes the rest)."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, min(start + size, total)))
        start += size
    if start < total:
        bounds.append((start, total))
    return bounds


UNEVEN = [[1, 1, 1], [1, 299], [37, 1, 200, 1], [100, 100, 100], [7] * 43, [299, 1], [3, 0, 5]]


@pytest.mark.parametrize("sizes", UNEVEN)
def test_merge_states_of_float64_parts_is_exact(rng, sizes):
    q = rng.standard_normal((2, 6, 32))
    k = rng.standard_normal((301, 2, 32)) * 2
    v = rng.standard_normal((301, 2, 32))
    ref, ref_lse = attention_reference(q, k, v)
    parts = [attention_reference(q, k[a:b], v[a:b]) for a, b in chunk_bounds(len(k), sizes)]
    out, lse = merge_states(np.stack([o for o, _ in parts]), np.stack([l for _, l in parts]))
    assert rel_err(out, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12


@pytest.mark.parametrize("sizes", UNEVEN)
def test_merge_states_of_kernel_parts_matches_reference(rng, sizes):
    q = rng.standard_normal((1, 8, 64)).astype(np.float32)
    k = rng.standard_normal((301, 2, 64)).astype(np.float32)
    v = rng.standard_normal((301, 2, 64)).astype(np.float32)
    ref, ref_lse = attention_reference(q, k, v)
    parts = [flash_attention_forward(q, k[a:b], v[a:b], return_lse=True) for a, b in chunk_bounds(len(k), sizes)]
    out, lse = merge_states(np.stack([o for o, _ in parts]), np.stack([l for _, l in parts]))
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


def test_merge_states_is_associative(rng):
    outs = rng.standard_normal((3, 4, 16))
    lses = rng.standard_normal((3, 4)) * 10
    left = merge_states(
        np.stack([merge_states(outs[:2], lses[:2])[0], outs[2]]),
        np.stack([merge_states(outs[:2], lses[:2])[1], lses[2]]),
    )
    right = merge_states(
        np.stack([outs[0], merge_states(outs[1:], lses[1:])[0]]),
        np.stack([lses[0], merge_states(outs[1:], lses[1:])[1]]),
    )
    flat = merge_states(outs, lses)
    for a, b in [(left, flat), (right, flat)]:
        assert rel_err(a[0], b[0]) < 1e-12 and rel_err(a[1], b[1]) < 1e-12


def test_merge_states_ignores_empty_parts():
    outs = np.array([[[1.0, 2.0]], [[5.0, 5.0]]])
    lses = np.array([[0.0], [-np.inf]])
    out, lse = merge_states(outs, lses)
    assert np.array_equal(out, [[1.0, 2.0]]) and np.array_equal(lse, [0.0])
    out, lse = merge_states(outs, np.full((2, 1), -np.inf))
    assert np.array_equal(out, [[0.0, 0.0]]) and np.isneginf(lse).all()


@pytest.mark.parametrize(
    "kv_len, split_size",
    [
        (1000, 1),
        (1000, 3),
        (1000, 7),
        (1000, 333),
        (1000, 999),
        (1001, 100),
        (65, 64),
        (64, 64),
        (129, 2),
        (5000, 4999),
    ],
)
@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_forced_split_matches_reference(rng, kv_len, split_size, num_threads):
    """Uneven last chunks and chunks holding a single key (1001 = 10 * 100 + 1, 65 = 64 + 1, 5000 = 4999 + 1)."""
    q = rng.standard_normal((1, 12, 80)).astype(np.float32)
    k = rng.standard_normal((kv_len, 3, 80)).astype(np.float32)
    v = rng.standard_normal((kv_len, 3, 80)).astype(np.float32)
    out, lse = flash_attention_forward(q, k, v, return_lse=True, num_threads=num_threads, split_size=split_size)
    ref, ref_lse = attention_reference(q, k, v)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


def test_split_with_far_apart_chunk_maxima(rng):
    """Chunks whose scores differ by hundreds: the merge must rescale, not overflow."""
    q = np.ones((1, 4, 16), np.float32)
    k = rng.standard_normal((600, 1, 16)).astype(np.float32)
    k[300:] *= 40  # scores up to ~ +-600 in the second half
    v = rng.standard_normal((600, 1, 16)).astype(np.float32)
    out, lse = flash_attention_forward(q, k, v, return_lse=True, split_size=300, num_threads=2)
    ref, ref_lse = attention_reference(q, k, v)
    assert np.isfinite(out).all() and rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


@pytest.mark.parametrize("num_threads", [1, 2, 4])
def test_ragged_batch_split_path(rng, num_threads):
    lengths = [8, 16_000, 0, 1, 300, 2049, 5]
    view = random_view(rng, lengths, num_kv_heads=1, head_dim=64, spare=3)
    q_batch = rng.standard_normal((len(lengths), 8, 64)).astype(np.float32)
    ref = np.stack(
        [
            attention_reference(q_batch[b : b + 1], *[a[:n] for a in view.kv_for_slot(b)])[0][0]
            for b, n in enumerate(lengths)
        ]
    )
    for split_size in (None, 1000, 4096):
        out = batched_flash_attention(q_batch, view, num_threads=num_threads, split_size=split_size)
        assert rel_err(out, ref) < 1e-4, split_size


def covered(items, kv_lens):
    """Every row's keys are covered exactly once by its items."""
    for row, n in enumerate(kv_lens):
        spans = sorted((int(a), int(b)) for r, a, b, _ in items if r == row)
        assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] if n else spans == []
        assert (spans[-1][1] if spans else 0) == n
    return True


def test_auto_plan_splits_one_long_mqa_request():
    items, merges = plan_work([65_536], num_threads=2)
    assert len(items) >= 4 and len(merges) == 1 and covered(items, [65_536])
    assert all(b - a >= MIN_SPLIT for _, a, b, _ in items)


def test_auto_plan_does_not_split_a_uniform_batch():
    items, merges = plan_work([2048] * 16, num_threads=2)
    assert len(items) == 16 and len(merges) == 0 and (items[:, 3] == -1).all()


def test_auto_plan_never_splits_on_one_thread():
    items, merges = plan_work([65_536, 8, 100], num_threads=1)
    assert len(items) == 3 and len(merges) == 0


def test_auto_plan_skewed_batch_balances_work():
    lengths = [8, 16_384, 64, 1024, 8192, 16, 4096, 512]
    items, merges = plan_work(lengths, num_threads=2)
    assert covered(items, lengths)
    longest = max(b - a for _, a, b, _ in items)
    assert longest <= sum(lengths) / 4  # no item is a big share of the work
    assert list(items[:, 2] - items[:, 1]) == sorted(items[:, 2] - items[:, 1], reverse=True)
