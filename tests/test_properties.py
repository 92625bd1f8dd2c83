"""Property tests (hypothesis): random shapes against the float64 reference, and invariants."""

import numpy as np
from conftest import property_settings, rel_err
from hypothesis import given
from hypothesis import strategies as st

from flashdecode import (
    KvSlot,
    ListKvView,
    attention_reference,
    batched_flash_attention,
    flash_attention_forward,
    merge_states,
)
from flashdecode.batching import batched_reference
from flashdecode.tiling import flash_attention_numpy
from flashdecode.variants import batched_variant_reference

PROPERTY = property_settings(60)


@st.composite
def ragged_batches(draw):
    """(q_batch, view, scale): a random ragged batch with random GQA shape, dims and capacity."""
    num_kv_heads = draw(st.integers(1, 4))
    group = draw(st.integers(1, 8))
    head_dim = draw(st.sampled_from([1, 2, 3, 8, 15, 16, 17, 64, 80, 128]))
    lengths = draw(st.lists(st.integers(0, 300), min_size=0, max_size=6))
    spare = draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.sampled_from([0.1, 1.0, 10.0]))
    rng = np.random.default_rng(seed)
    q_batch = (rng.standard_normal((len(lengths), group * num_kv_heads, head_dim)) * spread).astype(np.float32)
    keys = [rng.standard_normal((n + spare, num_kv_heads, head_dim)).astype(np.float32) for n in lengths]
    values = [rng.standard_normal((n + spare, num_kv_heads, head_dim)).astype(np.float32) for n in lengths]
    view = ListKvView([KvSlot(b, b, n) for b, n in enumerate(lengths)], keys, values)
    scale = draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    return q_batch, view, scale


@PROPERTY
@given(
    ragged_batches(), st.one_of(st.none(), st.integers(1, 400)), st.integers(1, 3), st.sampled_from(["simd", "cython"])
)
def test_batched_matches_reference(batch, split_size, num_threads, backend):
    q_batch, view, scale = batch
    out, lse = batched_flash_attention(
        q_batch, view, scale, return_lse=True, split_size=split_size, num_threads=num_threads, backend=backend
    )
    ref, ref_lse = batched_reference(q_batch, view, scale)
    assert rel_err(out, ref) < 1e-4
    assert rel_err(lse, ref_lse) < 1e-4


@PROPERTY
@given(ragged_batches(), st.integers(1, 130))
def test_numpy_backend_any_tile_size(batch, tile_size):
    q_batch, view, scale = batch
    for b in range(view.slot_count()):
        position = view.position(b)
        k, v = view.kv_for_slot(b)
        out, lse = flash_attention_numpy(
            q_batch[b : b + 1], k[:position], v[:position], scale, return_lse=True, tile_size=tile_size
        )
        ref, ref_lse = attention_reference(q_batch[b : b + 1], k[:position], v[:position], scale)
        assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


@PROPERTY
@given(ragged_batches(), st.randoms(use_true_random=False))
def test_permuting_slots_permutes_outputs(batch, random):
    q_batch, view, scale = batch
    order = list(range(view.slot_count()))
    random.shuffle(order)
    shuffled = ListKvView(
        [KvSlot(view.slots[i].request_id, b, view.slots[i].position) for b, i in enumerate(order)],
        [view.keys[i] for i in order],
        [view.values[i] for i in order],
    )
    out = batched_flash_attention(q_batch, view, scale)
    out_shuffled = batched_flash_attention(q_batch[order], shuffled, scale)
    np.testing.assert_array_equal(out_shuffled, out[order])  # slots are independent: bit-identical


@PROPERTY
@given(st.integers(1, 8), st.integers(1, 3), st.sampled_from([1, 3, 64, 128]), st.integers(0, 2**32 - 1))
def test_single_key_returns_its_value(group, num_kv_heads, head_dim, seed):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((1, group * num_kv_heads, head_dim)) * 50).astype(np.float32)
    k = rng.standard_normal((1, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((1, num_kv_heads, head_dim)).astype(np.float32)
    out, lse = flash_attention_forward(q, k, v, return_lse=True)
    np.testing.assert_allclose(out[0], np.repeat(v[0], group, axis=0), rtol=1e-6)
    score = np.einsum("hd,hd->h", q[0], np.repeat(k[0], group, axis=0)) / np.sqrt(head_dim)
    np.testing.assert_allclose(lse[0], score, rtol=1e-4, atol=1e-4)  # lse of one key is its score


@PROPERTY
@given(
    st.integers(1, 2000),
    st.sampled_from([1, 16, 128]),
    st.integers(0, 2**32 - 1),
    st.one_of(st.none(), st.integers(1, 500)),
)
def test_constant_scores_give_mean_of_values(kv_len, head_dim, seed, split_size):
    rng = np.random.default_rng(seed)
    q = np.zeros((1, 4, head_dim), np.float32)  # q = 0: every score is 0
    k = rng.standard_normal((kv_len, 2, head_dim)).astype(np.float32)
    v = rng.standard_normal((kv_len, 2, head_dim)).astype(np.float32)
    out, lse = flash_attention_forward(q, k, v, return_lse=True, split_size=split_size)
    mean = np.repeat(v.astype(np.float64).mean(axis=0), 2, axis=0)
    assert rel_err(out[0], mean) < 1e-4
    np.testing.assert_allclose(lse, np.log(kv_len), rtol=1e-5)


@PROPERTY
@given(st.integers(1, 600), st.lists(st.integers(0, 600), min_size=1, max_size=6), st.integers(0, 2**32 - 1))
def test_merging_split_states_equals_unsplit(kv_len, cuts, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 6, 32)).astype(np.float32)
    k = rng.standard_normal((kv_len, 3, 32)).astype(np.float32)
    v = rng.standard_normal((kv_len, 3, 32)).astype(np.float32)
    bounds = sorted({0, kv_len, *(c % (kv_len + 1) for c in cuts)})  # uneven, possibly single-key splits
    parts = [flash_attention_forward(q, k[a:b], v[a:b], return_lse=True) for a, b in zip(bounds, bounds[1:])]
    parts.append(flash_attention_forward(q, k[:0], v[:0], return_lse=True))  # an empty part changes nothing
    merged, merged_lse = merge_states(np.stack([o for o, _ in parts]), np.stack([l for _, l in parts]))
    ref, ref_lse = attention_reference(q, k, v)
    assert rel_err(merged, ref) < 1e-4 and rel_err(merged_lse, ref_lse) < 1e-4


@PROPERTY
@given(
    ragged_batches(),
    st.one_of(st.none(), st.integers(0, 40)),
    st.one_of(st.none(), st.floats(0.5, 50.0)),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["simd", "cython", "numpy"]),
    st.integers(1, 3),
)
def test_variants_match_reference(batch, window_left, softcap, alibi, sinks, backend, num_threads):
    """Random ragged batches with random variants (chapter 09) against the float64 reference, every backend."""
    q_batch, view, scale = batch
    num_heads = q_batch.shape[1]
    rng = np.random.default_rng(num_heads)
    variants = dict(
        window_left=window_left,
        softcap=softcap,
        alibi_slopes=(2.0 ** -np.arange(1, num_heads + 1)) if alibi else None,
        sinks=rng.standard_normal(num_heads) if sinks else None,
    )
    out, lse = batched_flash_attention(
        q_batch, view, scale, return_lse=True, backend=backend, num_threads=num_threads, **variants
    )
    ref, ref_lse = batched_variant_reference(q_batch, view, scale, **variants)
    assert rel_err(out, ref) < 1e-4
    assert rel_err(lse, ref_lse) < 1e-4
