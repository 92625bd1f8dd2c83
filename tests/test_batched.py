"""batched_flash_attention and the KV views: oxillama's two tests (batched_attention.rs), the reference, the cache."""

import numpy as np
import pytest
from conftest import BACKENDS, random_view, rel_err

from flashdecode import BatchedKvView, KvCache, KvSlot, ListKvView, batched_flash_attention, flash_attention_forward
from flashdecode.api import TILE
from flashdecode.batching import batched_reference


def sin_data(n):
    return (np.sin(np.arange(n, dtype=np.float32) * 0.1) * 0.1).astype(np.float32)


def test_batched_kv_view_basic():
    """oxillama's `batched_kv_view_basic` test."""
    num_heads, head_dim = 2, 4
    kv_dim = num_heads * head_dim
    positions = [3, 7, 1]
    slots, keys, values = [], [], []
    for i, pos in enumerate(positions):
        slots.append(KvSlot(i + 1, i, pos))
        keys.append((i * 10.0 + np.arange(pos * kv_dim, dtype=np.float32)).reshape(pos, num_heads, head_dim))
        values.append((i * 100.0 + np.arange(pos * kv_dim, dtype=np.float32)).reshape(pos, num_heads, head_dim))
    view = ListKvView(slots, keys, values)
    assert isinstance(view, BatchedKvView)
    assert view.slot_count() == 3
    assert [view.position(i) for i in range(3)] == [3, 7, 1]
    for i, pos in enumerate(positions):
        k, v = view.kv_for_slot(i)
        assert k.size == pos * kv_dim and v.size == pos * kv_dim
    k0, v0 = view.kv_for_slot(0)
    assert k0.flat[0] == 0.0 and k0.flat[1] == 1.0 and v0.flat[0] == 0.0
    assert view.kv_for_slot(1)[0].flat[0] == 10.0
    assert view.kv_for_slot(2)[1].flat[0] == 200.0
    with pytest.raises(Exception):
        slots[0].position = 5  # KvSlot is frozen


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_flash_decode_matches_serial(backend):
    """oxillama's `batched_flash_decode_matches_serial` test."""
    num_heads, head_dim = 2, 8
    kv_dim = num_heads * head_dim
    i = lambda n: np.arange(n, dtype=np.float32)
    shape = lambda a: a.astype(np.float32).reshape(-1, num_heads, head_dim)
    q0, q1 = sin_data(kv_dim), np.cos(i(kv_dim) * 0.07) * 0.12
    k0, v0 = sin_data(16 * kv_dim), np.cos(i(16 * kv_dim) * 0.13) * 0.1
    k1, v1 = np.sin(i(24 * kv_dim) * 0.05 + 1.0) * 0.08, np.cos(i(24 * kv_dim) * 0.09 + 0.5) * 0.09
    view = ListKvView([KvSlot(1, 0, 16), KvSlot(2, 1, 24)], [shape(k0), shape(k1)], [shape(v0), shape(v1)])
    q_batch = np.concatenate([shape(q0), shape(q1)])
    out = batched_flash_attention(q_batch, view, 1 / np.sqrt(head_dim), backend=backend)
    assert out.shape == (2, num_heads, head_dim)
    for b, (q, k, v) in enumerate([(q0, k0, v0), (q1, k1, v1)]):
        serial = flash_attention_forward(shape(q), shape(k), shape(v), 1 / np.sqrt(head_dim), backend=backend)
        assert np.abs(out[b] - serial[0]).max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (5, 1), (14, 2), (32, 4), (16, 2)])
@pytest.mark.parametrize("head_dim", [1, 3, 64, 80, 128, 256])
def test_matches_reference(rng, backend, num_heads, num_kv_heads, head_dim):
    lengths = [0, 1, TILE - 1, TILE, TILE + 1, 300, 0]
    view = random_view(rng, lengths, num_kv_heads, head_dim, spare=5)
    q_batch = rng.standard_normal((len(lengths), num_heads, head_dim)).astype(np.float32)
    out, lse = batched_flash_attention(q_batch, view, return_lse=True, backend=backend)
    ref, ref_lse = batched_reference(q_batch, view)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4
    assert np.all(out[[0, 6]] == 0) and np.all(lse[[0, 6]] == -np.inf)


def test_backends_agree_on_skewed_batch(rng):
    lengths = [8, 3000, 17, 0, 1, 700, 64, 2]
    view = random_view(rng, lengths, 2, 64)
    q_batch = rng.standard_normal((len(lengths), 8, 64)).astype(np.float32)
    fast, fast_lse = batched_flash_attention(q_batch, view, return_lse=True)
    slow, slow_lse = batched_flash_attention(q_batch, view, return_lse=True, backend="numpy")
    assert (
        rel_err(fast, slow) < 1e-5 and rel_err(fast_lse[np.isfinite(slow_lse)], slow_lse[np.isfinite(slow_lse)]) < 1e-5
    )


@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("split_size", [None, 1, 7, 256])
def test_threads_and_splits(rng, num_threads, split_size):
    lengths = [1, 1000, 5, 0, 2049]
    view = random_view(rng, lengths, 1, 32)
    q_batch = rng.standard_normal((len(lengths), 4, 32)).astype(np.float32)
    out, lse = batched_flash_attention(q_batch, view, return_lse=True, num_threads=num_threads, split_size=split_size)
    ref, ref_lse = batched_reference(q_batch, view)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


def test_capacity_beyond_position_is_never_read(rng):
    cache = KvCache(num_slots=4, capacity=300, num_kv_heads=2, head_dim=16)
    cache.keys[:], cache.values[:] = np.nan, np.nan
    for slot, n in enumerate([1, 64, 299, 0]):
        cache.append(slot, rng.standard_normal((n, 2, 16)), rng.standard_normal((n, 2, 16)))
    q_batch = rng.standard_normal((4, 6, 16)).astype(np.float32)
    for backend in BACKENDS:
        for split_size in (None, 5):
            out = batched_flash_attention(
                q_batch, cache.view(range(4)), backend=backend, split_size=None if backend == "numpy" else split_size
            )
            assert np.isfinite(out).all()
            assert rel_err(out, batched_reference(q_batch, cache.view(range(4)))[0]) < 1e-4


def test_nan_in_one_slot_stays_in_that_slot(rng):
    view = random_view(rng, [10, 10, 10], 1, 8)
    view.keys[1][4, 0, 3] = np.nan
    q_batch = rng.standard_normal((3, 2, 8)).astype(np.float32)
    for split_size in (None, 3):
        out = batched_flash_attention(q_batch, view, split_size=split_size)
        assert np.isnan(out[1]).all()
        assert np.isfinite(out[[0, 2]]).all()


def test_kv_cache_append_reset_view(rng):
    cache = KvCache(num_slots=3, capacity=10, num_kv_heads=1, head_dim=4)
    k = rng.standard_normal((4, 1, 4))
    cache.append(0, k, k)
    cache.append(0, k[:2], k[:2])
    assert cache.position(0) == 6 and cache.position(1) == 0
    np.testing.assert_array_equal(cache.keys[0, 4:6], k[:2].astype(np.float32))
    view = cache.view([0, 2])
    assert view.slot_count() == 2 and view.position(0) == 6 and view.position(1) == 0
    assert np.shares_memory(view.kv_for_slot(0)[0], cache.keys)
    cache.reset(0)
    assert cache.position(0) == 0 and view.position(0) == 6  # a view keeps the positions it was made with
    cache.append(0, k[:1], k[:1])
    assert cache.position(0) == 1


def test_kv_cache_is_read_in_place(rng):
    """No packing copy: the kernel's extra memory is tiny next to the cache."""
    import tracemalloc

    cache = KvCache(num_slots=4, capacity=4096, num_kv_heads=2, head_dim=64)
    cache.positions[:] = 4096
    q_batch = rng.standard_normal((4, 4, 64)).astype(np.float32)
    batched_flash_attention(q_batch, cache.view(range(4)))
    tracemalloc.start()
    batched_flash_attention(q_batch, cache.view(range(4)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < (cache.keys.nbytes + cache.values.nbytes) / 100


def test_empty_batch(rng):
    view = ListKvView([], [], [])
    out, lse = batched_flash_attention(np.zeros((0, 4, 8), np.float32), view, return_lse=True)
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


def test_all_slots_empty(rng):
    view = random_view(rng, [0, 0], 2, 8)
    out, lse = batched_flash_attention(np.ones((2, 4, 8)), view, return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_custom_view_protocol(rng):
    """Any object with the three methods works, e.g. one computing the arrays on demand."""

    class Paged:
        def __init__(self, pages):
            self.pages = pages

        def slot_count(self):
            return len(self.pages)

        def position(self, slot):
            return sum(len(p) for p in self.pages[slot])

        def kv_for_slot(self, slot):
            k = np.concatenate(self.pages[slot])
            return k, -k

    pages = [[rng.standard_normal((3, 1, 8)) for _ in range(n)] for n in (1, 4)]
    view = Paged(pages)
    assert isinstance(view, BatchedKvView)
    q_batch = rng.standard_normal((2, 2, 8))
    out = batched_flash_attention(q_batch, view)
    assert rel_err(out, batched_reference(q_batch, view)[0]) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layout", ["float16", "float64", ">f4", ">f2", "fortran", "reversed", "gapped", "readonly", "mixed"]
)
def test_odd_but_valid_slot_arrays(rng, backend, layout):
    lengths = [5, 0, 70, 1]
    base = random_view(rng, lengths, 2, 16, spare=3)
    convert = {
        "float16": lambda a: a.astype(np.float16),
        "float64": lambda a: a.astype(np.float64),
        ">f4": lambda a: a.astype(">f4"),  # float32 by name, its bytes in the other order
        ">f2": lambda a: a.astype(">f2"),
        "fortran": np.asfortranarray,
        "reversed": lambda a: a[::-1].copy()[::-1],
        "gapped": lambda a: np.repeat(a, 2, axis=-1)[..., ::2],
        "readonly": lambda a: np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape),  # read-only buffer
        "mixed": lambda a: a.astype([np.float16, np.float64, np.float32][a.shape[0] % 3]),
    }[layout]
    view = ListKvView(base.slots, [convert(k) for k in base.keys], [convert(v) for v in base.values])
    q_batch = (
        convert(rng.standard_normal((4, 6, 16)).astype(np.float32))
        if layout != "mixed"
        else rng.standard_normal((4, 6, 16))
    )
    snapshot = [a.copy() for a in [q_batch, *view.keys, *view.values]]
    out, lse = batched_flash_attention(q_batch, view, return_lse=True, backend=backend)
    ref, ref_lse = batched_reference(q_batch, view)
    tolerance = 2e-3 if layout in ("float16", ">f2", "mixed") else 1e-4
    assert rel_err(out, ref) < tolerance and rel_err(lse, ref_lse) < tolerance
    for before, after in zip(snapshot, [q_batch, *view.keys, *view.values]):
        np.testing.assert_array_equal(before, after)  # inputs are never written to


def test_length_one_caches_and_huge_logits(rng):
    view = random_view(rng, [1, 1, 1], 1, 32)
    q_batch = (rng.standard_normal((3, 4, 32)) * 1e4).astype(np.float32)  # scores ~ 1e4
    out, lse = batched_flash_attention(q_batch, view, return_lse=True)
    for b in range(3):
        np.testing.assert_allclose(out[b], np.repeat(view.values[b][0], 4, axis=0), rtol=1e-6)
    assert np.isfinite(lse).all()
    big = random_view(rng, [500], 1, 32)
    out = batched_flash_attention(q_batch[:1], big)
    assert np.isfinite(out).all() and rel_err(out, batched_reference(q_batch[:1], big)[0]) < 1e-4
