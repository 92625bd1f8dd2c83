"""Storage formats (chapter 08): float16, bfloat16 and int8 caches read in place by every tile kernel, exactly
the float32 answer over the numbers as stored; quantisation; the error contract; memory per call."""

import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from conftest import BACKENDS, TILE_KERNELS, rel_err

from flashdecode import AttentionError, KvCache, KvSlot, ListKvView, PagedKvCache, _kernels, batched_flash_attention
from flashdecode.storage import dequantize_int8, quantize_int8, storage_dtype

FORMATS = ["float32", "float16", "bfloat16", "int8"]


def stored(x, format):
    """x as a cache of this format stores it, and the float32 numbers that stands for (values, scales, floats)."""
    if format == "int8":
        values, scales = quantize_int8(x)
        return values, scales, dequantize_int8(values, scales)
    values = x.astype(storage_dtype(format))
    return values, None, values.astype(np.float32)


@pytest.fixture(params=["x86-64-v3", "portable"])
def conversion_path(request):
    """Run a test with the SIMD kernels converting float16, bfloat16 and int8 with the x86-64-v3 instructions,
    then with the portable vector code."""
    used = _kernels.use_v3(request.param == "x86-64-v3")
    if request.param == "x86-64-v3" and not used:
        pytest.skip("this CPU lacks x86-64-v3 (AVX2, FMA, F16C): only the portable conversions run here")
    yield request.param
    _kernels.use_v3(True)


@pytest.mark.parametrize("kernels", TILE_KERNELS)
@pytest.mark.parametrize("format", FORMATS)
def test_tile_kernels_read_every_format_exactly(kernels, format, conversion_path):
    rng = np.random.default_rng(FORMATS.index(format))
    for group in range(1, 9):
        for n in (0, 1, 2, 3, 4, 5, 8, 17, 40):
            head_dim = 1 + (n * 7 + group) % 40
            q = rng.standard_normal((2 * group, head_dim)).astype(np.float32)
            keys, scales, floats = stored(rng.standard_normal((n, 2, head_dim)).astype(np.float32) * 3, format)
            heads = np.repeat(np.arange(2), group)
            scores = _kernels.tile_scores(q, keys, kernels, k_scales=scales)
            assert np.allclose(scores, np.einsum("hd,nhd->hn", q, floats[:, heads]), rtol=1e-5, atol=1e-4)
            acc = np.zeros((2 * group, head_dim), np.float32)
            _kernels.tile_update(acc, scores, keys, kernels, v_scales=scales)
            assert np.allclose(acc, np.einsum("hn,nhd->hd", scores, floats[:, heads]), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kernels", TILE_KERNELS)
def test_float16_special_values(kernels, conversion_path):
    """Subnormals, the largest float16, infinities and NaN convert exactly (the integer and the F16C paths)."""
    special = np.array(
        [6e-8, -6e-6, 65504, -65504, np.inf, -np.inf, 0.0, -0.0, 1.0, np.nan, 3.14, 1e-4, 2.0, -2.5, 100.0, 7e-5],
        np.float16,
    )
    values = np.broadcast_to(special, (1, 1, 16)).copy()
    acc = np.zeros((1, 16), np.float32)
    _kernels.tile_update(acc, np.ones((1, 1), np.float32), values, kernels)  # acc = 1 · value, lane by lane
    expected = special.astype(np.float32)
    assert np.array_equal(np.isnan(acc[0]), np.isnan(expected))
    assert np.array_equal(acc[0][~np.isnan(expected)], expected[~np.isnan(expected)])


@pytest.mark.parametrize("kernels", TILE_KERNELS)
def test_every_float16_value_converts_exactly_in_a_row_tail(kernels, conversion_path):
    """A head dimension of 7 sends every element through the one-at-a-time tail conversion: all 63,488 finite
    float16 values (subnormals included) as one-hot scores, then infinities and NaN as an update."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)]
    keys = np.concatenate([finite, np.zeros(-len(finite) % 7, np.float16)]).reshape(-1, 1, 7)
    scores = _kernels.tile_scores(np.eye(7, dtype=np.float32), keys, kernels)  # scores[h, j] = keys[j, 0, h]
    assert np.array_equal(scores.T.reshape(-1)[: len(finite)], finite.astype(np.float32))
    special = np.array([[[np.inf, -np.inf, np.nan, 65504, -0.0, 6e-8, 1.0]]], np.float16)
    acc = np.zeros((1, 7), np.float32)
    _kernels.tile_update(acc, np.ones((1, 1), np.float32), special, kernels)
    expected = special[0, 0].astype(np.float32)
    assert np.array_equal(acc[0], expected, equal_nan=True)


@pytest.mark.parametrize("kernels", TILE_KERNELS)
def test_every_int8_and_bfloat16_value_converts_exactly(kernels, conversion_path):
    """All 256 int8 values, and bfloat16's extremes, infinities and NaN, lane by lane (both paths)."""
    int8 = np.arange(-128, 128, dtype=np.int16).astype(np.int8).reshape(256, 1, 1).repeat(16, axis=2)
    acc = np.zeros((1, 16), np.float32)
    _kernels.tile_update(acc, np.ones((1, 256), np.float32), int8, kernels, v_scales=np.ones((256, 1), np.float32))
    assert np.array_equal(acc[0], np.full(16, -128.0, np.float32))  # the sum of -128..127
    weights = (np.arange(256) == 200).astype(np.float32)[None]  # picks out the value 200 - 128 = 72
    acc = np.zeros((1, 16), np.float32)
    _kernels.tile_update(acc, weights, int8, kernels, v_scales=np.ones((256, 1), np.float32))
    assert np.array_equal(acc[0], np.full(16, 72.0, np.float32))
    bf16 = np.array([3.0e38, -3.0e38, 1e-38, np.inf, -np.inf, 0.0, -1.0, 0.5, 1, 2, 3, 4, 5, 6, 7, np.nan], np.float32)
    bf16 = bf16.astype(storage_dtype("bfloat16"))
    acc = np.zeros((1, 16), np.float32)
    _kernels.tile_update(acc, np.ones((1, 1), np.float32), bf16.reshape(1, 1, 16).copy(), kernels)
    expected = bf16.astype(np.float32)
    assert np.array_equal(acc[0][:-1], expected[:-1]) and np.isnan(acc[0][-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("format", FORMATS)
def test_caches_give_the_float32_answer_over_the_stored_numbers(backend, format):
    rng = np.random.default_rng(3)
    lengths = [300, 0, 77, 1000, 1]
    cache, exact = KvCache(5, 1000, 2, 64, dtype=format), KvCache(5, 1000, 2, 64)
    paged = PagedKvCache(200, 16, 2, 64, dtype=format)
    seqs = [paged.new_sequence() for _ in lengths]
    for slot, n in enumerate(lengths):
        k, v = rng.standard_normal((2, n, 2, 64))
        cache.append(slot, k, v)
        paged.append(seqs[slot], k, v)
        exact.append(slot, stored(k.astype(np.float32), format)[2], stored(v.astype(np.float32), format)[2])
    fork = paged.fork(seqs[2])
    paged.append(fork, *rng.standard_normal((2, 3, 2, 64)))  # a copy-on-write copies the scales too
    for parent, child in zip(paged.view(seqs[2:3]).kv_for_slot(0), paged.view([fork]).kv_for_slot(0)):
        assert np.array_equal(child[:77], parent[:77])  # the fork's private copy of the shared block
    q_batch = rng.standard_normal((5, 8, 64)).astype(np.float32)
    ref, ref_lse = batched_flash_attention(q_batch, exact.view(range(5)), return_lse=True, backend="numpy")
    for view in (cache.view(range(5)), paged.view(seqs)):
        out, lse = batched_flash_attention(q_batch, view, return_lse=True, backend=backend, split_size=128)
        assert rel_err(out, ref) < 1e-4 and np.allclose(lse, ref_lse, atol=1e-4), type(view).__name__


def test_int8_no_worse_than_a_plain_absmax_quantiser():
    """Per token and kv head scales: never worse than one absmax scale for the whole tensor."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 4, 64)).astype(np.float32)
    x[:, :, :3] *= 15  # outlier channels
    values, scales = quantize_int8(x)
    one = np.abs(x).max() / 127
    assert np.abs(dequantize_int8(values, scales) - x).mean() <= np.abs(np.rint(x / one) * one - x).mean()
    assert np.all(np.abs(dequantize_int8(values, scales) - x) <= scales[..., None] / 2 * (1 + 1e-6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_formats_across_slots_work(backend):
    rng = np.random.default_rng(5)
    keys = [
        rng.standard_normal((n, 2, 16)).astype(dtype)
        for n, dtype in [(40, np.float32), (30, np.float16), (20, ml_dtypes.bfloat16), (10, np.float64)]
    ]
    view = ListKvView([KvSlot(b, b, len(k)) for b, k in enumerate(keys)], keys, keys)
    exact = ListKvView(
        [KvSlot(b, b, len(k)) for b, k in enumerate(keys)],
        [k.astype(np.float32) for k in keys],
        [k.astype(np.float32) for k in keys],
    )
    q = rng.standard_normal((4, 4, 16)).astype(np.float32)
    assert (
        rel_err(batched_flash_attention(q, view, backend=backend), batched_flash_attention(q, exact, backend="numpy"))
        < 1e-5
    )


@pytest.mark.parametrize("dtype", [np.int16, np.complex64, object, "float8", "int4", np.uint8])
def test_bad_storage_dtypes(dtype):
    for make in (lambda: KvCache(2, 8, 1, 4, dtype=dtype), lambda: PagedKvCache(4, 4, 1, 4, dtype=dtype)):
        with pytest.raises(AttentionError, match="dtype must be one of"):
            make()


class Int8SlotsOfTwoShapes:
    """A view whose int8 slots, read as stored, disagree on the number of kv heads (2, then 4)."""

    def slot_count(self):
        return 2

    def position(self, slot):
        return 3

    def kv_int8_for_slot(self, slot):
        values, scales = quantize_int8(np.ones((3, 2 * (slot + 1), 8), np.float32))
        return values, values, scales, scales

    def kv_for_slot(self, slot):
        return tuple(dequantize_int8(*self.kv_int8_for_slot(slot)[::2]) for _ in range(2))


@pytest.mark.parametrize("backend", ["cython", "simd"])
def test_int8_slots_must_agree_on_kv_heads(backend):
    # the kernel reads every slot with one Hkv: a slot with fewer heads would be read past its end
    q = np.ones((2, 4, 8), np.float32)
    with pytest.raises(AttentionError, match="same number of kv heads: slot 1 keys \\(3, 4, 8\\)"):
        batched_flash_attention(q, Int8SlotsOfTwoShapes(), backend=backend)


def test_int8_arrays_without_scales_are_refused():
    keys = np.ones((5, 1, 4), np.int8)
    view = ListKvView([KvSlot(0, 0, 5)], [keys], [keys])
    with pytest.raises(AttentionError, match="real float array"):
        batched_flash_attention(np.ones((1, 1, 4), np.float32), view)


@pytest.mark.parametrize("format", FORMATS)
def test_extra_memory_per_call_does_not_grow_with_the_cache(format):
    peaks = []
    for length in (1024, 16384):
        cache = KvCache(2, length, 2, 64, dtype=format)
        cache.positions[:] = length
        q = np.ones((2, 8, 64), np.float32)
        batched_flash_attention(q, cache.view([0, 1]))
        tracemalloc.start()
        batched_flash_attention(q, cache.view([0, 1]))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] * 1.5 + 4096, peaks
