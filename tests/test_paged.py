"""PagedKvCache (free list, block tables, fork with copy-on-write, free) and attention over paged views.

Attention is checked against the float64 reference computed from a plain model of each sequence's tokens,
with NaN in every free block and every unused tail slot: a kernel that reads outside a sequence's tokens
returns NaN there. Every refused call must leave the whole cache exactly as it was.
"""

import numpy as np
import pytest
from conftest import rel_err
from paged_helpers import (
    ATTEND,
    PAGED_BACKENDS,
    ModelledCache,
    assert_consistent,
    assert_same_state,
    cache_state,
    fill_unused_with_nan,
)
from test_memory import peak_during

from flashdecode import AttentionError, BatchedKvView, KvCache, KvSlot, ListKvView, PagedKvCache
from flashdecode.batching import batched_reference
from flashdecode.paged import PagedBatchedKvView, check_paged_batch, gather_tokens, is_paged, paged_attention_numpy

LONGEST = 300


def mixed_batch(block_size, seed=0):
    """A cache after arrivals, decode steps, a fork that diverges, a free and a reuse of the freed blocks;
    returns (ModelledCache, seqs) with one sequence twice in seqs and an empty one."""
    model = ModelledCache(num_blocks=8 + 3 * 2 * LONGEST // block_size, block_size=block_size, seed=seed)
    empty, short, middle, longest = model.new(0), model.new(1), model.new(130), model.new(LONGEST - 10)
    beam = model.fork(middle)
    model.append(beam, 5)  # the fork and its parent diverge ...
    model.append(middle, 2)
    model.append(longest, 10)  # ... while others keep decoding
    gone = model.new(97)
    blocks_given_back = set(model.cache.block_table(gone).tolist())
    model.free(gone)
    reused = model.new(70)  # takes the blocks `gone` gave back
    assert set(model.cache.block_table(reused).tolist()) <= blocks_given_back
    return model, [empty, short, middle, longest, beam, reused, middle]


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("group", range(1, 9))
@pytest.mark.parametrize("block_size", [1, 3, 16, 64, LONGEST + 1])
def test_attention_matches_reference(backend, group, block_size):
    model, seqs = mixed_batch(block_size, seed=group)
    fill_unused_with_nan(model.cache)
    rng = np.random.default_rng(block_size)
    q_batch = rng.standard_normal((len(seqs), group * 2, 8)).astype(np.float32)
    out, lse = ATTEND[backend](q_batch, model.cache.view(seqs), None)
    ref, ref_lse = model.reference(q_batch, seqs)
    assert out.shape == q_batch.shape and out.dtype == np.float32 and lse.shape == q_batch.shape[:2]
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)  # the empty sequence


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_same_sequence_twice_gives_the_same_answer(backend):
    model, seqs = mixed_batch(16)
    fill_unused_with_nan(model.cache)
    q_batch = np.random.default_rng(1).standard_normal((3, 4, 8)).astype(np.float32)
    q_batch[2] = q_batch[0]
    out, lse = ATTEND[backend](q_batch, model.cache.view([seqs[3], seqs[2], seqs[3]]), 0.3)
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(lse[0], lse[2])
    assert rel_err(out, model.reference(q_batch, [seqs[3], seqs[2], seqs[3]], 0.3)[0]) < 1e-4


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_pool_dtypes_are_computed_in_float32(backend, dtype):
    cache = PagedKvCache(num_blocks=12, block_size=5, num_kv_heads=1, head_dim=4, dtype=dtype)
    seq = cache.new_sequence()
    rng = np.random.default_rng(2)
    cache.append(seq, rng.standard_normal((23, 1, 4)), rng.standard_normal((23, 1, 4)))
    q_batch = rng.standard_normal((1, 2, 4)).astype(np.float32)
    out, lse = ATTEND[backend](q_batch, cache.view([seq]), None)
    ref, ref_lse = batched_reference(q_batch, cache.view([seq]))  # over the stored (rounded) values
    assert out.dtype == np.float32 and rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_attention_reads_and_writes_nothing_else(backend):
    model, seqs = mixed_batch(7)
    fill_unused_with_nan(model.cache)
    before = cache_state(model.cache)
    q_batch = np.random.default_rng(3).standard_normal((len(seqs), 2, 8)).astype(np.float32)
    q_copy = q_batch.copy()
    ATTEND[backend](q_batch, model.cache.view(seqs), None)
    assert_same_state(before, cache_state(model.cache))
    np.testing.assert_array_equal(q_batch, q_copy)


@pytest.mark.parametrize("block_size", [3, 16])
@pytest.mark.parametrize("tile_size", [1, 7, 64, 1000])
def test_any_number_of_blocks_per_tile(block_size, tile_size):
    model, seqs = mixed_batch(block_size)
    fill_unused_with_nan(model.cache)
    q_batch = np.random.default_rng(4).standard_normal((len(seqs), 4, 8)).astype(np.float32)
    out, lse = paged_attention_numpy(q_batch, model.cache.view(seqs), return_lse=True, tile_size=tile_size)
    ref, ref_lse = model.reference(q_batch, seqs)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


def test_check_paged_batch_hands_the_kernel_pools_in_place_and_cut_tables():
    model, seqs = mixed_batch(16)
    view = model.cache.view(seqs)
    q_batch, key_pool, value_pool, slots = check_paged_batch(np.ones((len(seqs), 2, 8), np.float16), view)
    assert key_pool is model.cache.keys and value_pool is model.cache.values  # never a copy of the pool
    assert q_batch.dtype == np.float16  # converted later, per tile
    for slot, (position, table) in enumerate(slots):
        assert position == view.position(slot) and table.dtype == np.intp
        assert table.tolist() == view.block_table(slot)[: -(-position // 16)].tolist()


def test_a_fresh_pool_hands_out_blocks_in_order():
    cache = PagedKvCache(num_blocks=6, block_size=4, num_kv_heads=1, head_dim=2)
    assert cache.num_free_blocks == 6 and cache.keys.shape == cache.values.shape == (6, 4, 1, 2)
    seq = cache.new_sequence()
    assert cache.position(seq) == 0 and cache.block_table(seq).tolist() == [] and cache.num_free_blocks == 6
    cache.append(seq, np.ones((9, 1, 2)), np.ones((9, 1, 2)))
    assert cache.block_table(seq).tolist() == [0, 1, 2] and cache.block_table(seq).dtype == np.intp
    assert cache.position(seq) == 9 and cache.num_free_blocks == 3
    cache.append(seq, np.ones((0, 1, 2)), np.ones((0, 1, 2)))  # nothing to write: nothing taken
    assert cache.position(seq) == 9 and cache.num_free_blocks == 3


def test_tokens_land_at_table_index_and_offset():
    model = ModelledCache(num_blocks=10, block_size=3, num_kv_heads=1, head_dim=2)
    seq = model.new(4)
    model.append(seq, 1)
    model.append(seq, 5)
    table = model.cache.block_table(seq)
    for t in range(10):
        np.testing.assert_array_equal(model.cache.keys[table[t // 3], t % 3], model.keys[seq][t])
        np.testing.assert_array_equal(model.cache.values[table[t // 3], t % 3], model.values[seq][t])


def test_fork_shares_blocks_and_copies_the_partly_filled_one_on_first_write():
    model = ModelledCache(num_blocks=12, block_size=4)
    parent = model.new(10)  # blocks 0, 1 full; block 2 holds 2 tokens
    child = model.fork(parent)
    cache = model.cache
    assert cache.block_table(child).tolist() == cache.block_table(parent).tolist() == [0, 1, 2]
    assert cache.ref_counts[:3].tolist() == [2, 2, 2] and cache.num_free_blocks == 9
    model.append(child, 1)  # into shared block 2: copied first
    assert cache.block_table(child).tolist() == [0, 1, 3] and cache.ref_counts[[2, 3]].tolist() == [1, 1]
    model.append(parent, 3)  # block 2 is the parent's alone: written in place
    assert cache.block_table(parent).tolist() == [0, 1, 2, 4]
    model.append(child, 1)  # its own copy, now full: no new block
    assert cache.block_table(child).tolist() == [0, 1, 3] and cache.num_free_blocks == 7
    assert_consistent(cache, model.keys, model.values)  # parent and child each see only their own tokens


def test_full_shared_blocks_are_never_copied():
    model = ModelledCache(num_blocks=12, block_size=4)
    parent = model.new(8)
    children = [model.fork(parent) for _ in range(3)]
    free = model.cache.num_free_blocks
    for seq in [parent, *children]:
        model.append(seq, 1)  # each takes one new block, none copies
    assert model.cache.num_free_blocks == free - 4
    assert all(model.cache.block_table(seq).tolist()[:2] == [0, 1] for seq in children)
    assert model.cache.ref_counts[:2].tolist() == [4, 4]
    assert_consistent(model.cache, model.keys, model.values)


def test_last_holder_writes_in_place():
    model = ModelledCache(num_blocks=12, block_size=4)
    parent = model.new(6)
    beams = [model.fork(parent) for _ in range(3)]
    model.free(parent)
    free = model.cache.num_free_blocks
    for beam in beams:
        model.append(beam, 1)
    assert free - model.cache.num_free_blocks == 2  # two copies; the third beam holds the block alone
    assert model.cache.block_table(beams[2]).tolist() == [0, 1]
    assert_consistent(model.cache, model.keys, model.values)


def test_free_returns_blocks_nobody_else_holds_and_they_are_reused():
    model = ModelledCache(num_blocks=8, block_size=4)
    a, b = model.new(8), model.new(5)
    twin = model.fork(a)
    model.free(a)
    assert model.cache.num_free_blocks == 4 and model.cache.ref_counts[:2].tolist() == [1, 1]  # twin holds them
    model.free(b)
    assert model.cache.num_free_blocks == 6
    c = model.new(8)
    assert sorted(model.cache.block_table(c).tolist()) == [2, 3]  # b's blocks, reused
    model.free(twin)
    assert model.cache.num_free_blocks == 6 and model.cache.ref_counts.tolist().count(0) == 6
    assert_consistent(model.cache, model.keys, model.values)
    with pytest.raises(AttentionError, match="live sequence"):
        model.cache.position(a)


def call_and_expect_unchanged(cache, call, match):
    before = cache_state(cache)
    with pytest.raises(AttentionError, match=match):
        call()
    assert_same_state(before, cache_state(cache))


@pytest.fixture
def busy_cache():
    """Blocks of 4: `half` at 6 tokens shares its half-full block 1 with a fork; 3 blocks are free."""
    model = ModelledCache(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=3)
    half = model.new(6)
    model.fork(half)
    model.new(9)
    fill_unused_with_nan(model.cache)
    return model.cache, half


def test_out_of_blocks_changes_nothing(busy_cache):
    cache, half = busy_cache
    ones = lambda n: np.ones((n, 2, 3))
    call_and_expect_unchanged(cache, lambda: cache.append(half, ones(15), ones(15)), "out of blocks")
    # 14 new tokens need exactly the 3 free blocks, plus the copy of the shared block: one short
    call_and_expect_unchanged(cache, lambda: cache.append(half, ones(14), ones(14)), "out of blocks")
    fresh = cache.new_sequence()
    call_and_expect_unchanged(cache, lambda: cache.append(fresh, ones(13), ones(13)), "out of blocks")
    cache.append(fresh, ones(12), ones(12))  # exactly what is free
    assert cache.num_free_blocks == 0


@pytest.mark.parametrize(
    "k_shape, v_shape",
    [
        ((3, 2, 4), (3, 2, 4)),
        ((3, 1, 3), (3, 1, 3)),
        ((3, 2, 3), (2, 2, 3)),
        ((3, 2, 3), (3, 2, 4)),
        ((2, 3), (2, 3)),
        ((1, 3, 2, 3), (1, 3, 2, 3)),
    ],
)
def test_wrong_shapes_change_nothing(busy_cache, k_shape, v_shape):
    cache, half = busy_cache
    call_and_expect_unchanged(cache, lambda: cache.append(half, np.ones(k_shape), np.ones(v_shape)), "shape")


def test_wrong_dtypes_change_nothing(busy_cache):
    cache, half = busy_cache
    call_and_expect_unchanged(
        cache, lambda: cache.append(half, np.ones((1, 2, 3), int), np.ones((1, 2, 3))), "real float"
    )
    call_and_expect_unchanged(cache, lambda: cache.append(half, "keys", np.ones((1, 2, 3))), "array")


@pytest.mark.parametrize("seq", [99, -1, 1.0, "0", True, None, 3])
def test_unknown_sequences_change_nothing(busy_cache, seq):
    cache, half = busy_cache
    cache.free(cache.fork(half))  # id 3 existed and was freed: stale now
    for call in [
        lambda: cache.append(seq, np.ones((1, 2, 3)), np.ones((1, 2, 3))),
        lambda: cache.fork(seq),
        lambda: cache.free(seq),
        lambda: cache.view([half, seq]),
        lambda: cache.position(seq),
        lambda: cache.block_table(seq),
    ]:
        call_and_expect_unchanged(cache, call, "live sequence")


@pytest.mark.parametrize(
    "arguments, match",
    [
        ((-1, 4, 1, 1), "num_blocks"),
        ((4, 0, 1, 1), "block_size"),
        ((4, 4, 0, 1), "num_kv_heads"),
        ((4, 4, 1, 0), "head_dim"),
        ((4.0, 4, 1, 1), "num_blocks"),
        ((4, True, 1, 1), "block_size"),
    ],
)
def test_constructor_checks_its_arguments(arguments, match):
    with pytest.raises(AttentionError, match=match):
        PagedKvCache(*arguments)
    for dtype in (np.int32, "floaty", np.complex64):
        with pytest.raises(AttentionError, match="dtype"):
            PagedKvCache(4, 4, 1, 1, dtype=dtype)


def test_view_offers_the_paged_protocol():
    model, seqs = mixed_batch(16)
    view = model.cache.view(seqs)
    assert isinstance(view, PagedBatchedKvView) and isinstance(view, BatchedKvView) and is_paged(view)
    key_pool, value_pool = view.kv_pools()
    assert key_pool is model.cache.keys and value_pool is model.cache.values
    assert view.slot_count() == len(seqs)
    for slot, seq in enumerate(seqs):
        table = view.block_table(slot)
        assert table.dtype == np.intp and table.ndim == 1 and not table.flags.writeable
        assert len(table) >= -(-view.position(slot) // 16) and view.position(slot) == len(model.keys[seq])
        k, v = view.kv_for_slot(slot)  # the generic method: a gathered copy
        np.testing.assert_array_equal(k, model.keys[seq])
        np.testing.assert_array_equal(v, model.values[seq])
        assert not np.shares_memory(k, key_pool)
    # a view keeps the positions of when it was taken
    model.append(seqs[1], 3)
    assert view.position(1) == 1 and model.cache.view(seqs).position(1) == 4


def test_plain_views_are_not_paged():
    cache = KvCache(num_slots=2, capacity=8, num_kv_heads=1, head_dim=2)
    plain = ListKvView([KvSlot(0, 0, 1)], [np.ones((1, 1, 2))], [np.ones((1, 1, 2))])
    for view in (cache.view([0, 1]), plain):
        assert not is_paged(view) and not isinstance(view, PagedBatchedKvView)
        with pytest.raises(AttentionError, match="PagedBatchedKvView"):
            paged_attention_numpy(np.ones((view.slot_count(), 1, 2)), view)


class TableView:
    """A hand-made paged view: pools, a (B, max_blocks) table matrix and lengths, all under the test's control."""

    def __init__(self, key_pool, value_pool, tables, lengths):
        self.key_pool, self.value_pool, self.tables, self.lengths = key_pool, value_pool, tables, lengths

    def slot_count(self):
        return len(self.lengths)

    def position(self, slot):
        return self.lengths[slot]

    def kv_pools(self):
        return self.key_pool, self.value_pool

    def block_table(self, slot):
        return self.tables[slot]

    def kv_for_slot(self, slot):
        return tuple(gather_tokens(pool, self.tables[slot], self.lengths[slot]) for pool in self.kv_pools())


def hand_view():
    rng = np.random.default_rng(5)
    key_pool = rng.standard_normal((6, 4, 2, 3)).astype(np.float32)
    value_pool = rng.standard_normal((6, 4, 2, 3)).astype(np.float32)
    return TableView(key_pool, value_pool, np.array([[5, 0, -7], [1, 1, 2]]), [6, 9])


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_a_hand_written_view_reads_only_the_entries_it_needs(backend):
    view = hand_view()  # slot 0's third entry is garbage (-7); slot 1 names block 1 twice
    view.key_pool[[3, 4]] = np.nan
    q_batch = np.random.default_rng(6).standard_normal((2, 4, 3)).astype(np.float32)
    out, lse = ATTEND[backend](q_batch, view, None)
    ref, ref_lse = batched_reference(q_batch, view)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4


def broken(change):
    view = hand_view()
    change(view)
    return view


@pytest.mark.parametrize(
    "view, match",
    [
        (broken(lambda v: setattr(v, "tables", np.array([[5, 6, 0], [1, 1, 2]]))), "outside the pool"),
        (broken(lambda v: setattr(v, "tables", np.array([[-1, 0, 0], [1, 1, 2]]))), "outside the pool"),
        (broken(lambda v: setattr(v, "tables", np.array([[5.0, 0.0], [1.0, 2.0]]))), "integer"),
        (broken(lambda v: setattr(v, "tables", [np.array([5]), np.array([1, 1, 2])])), "at least 2"),
        (broken(lambda v: setattr(v, "tables", [np.array([[5, 0]]), np.array([1, 1, 2])])), "1-d"),
        (broken(lambda v: setattr(v, "tables", [None, np.array([1, 1, 2])])), "NoneType"),
        (broken(lambda v: setattr(v, "lengths", [6, -1])), "position"),
        (broken(lambda v: setattr(v, "lengths", [6, 2.0])), "position"),
        (broken(lambda v: setattr(v, "lengths", [6])), "slot_count"),
        (broken(lambda v: setattr(v, "value_pool", v.value_pool[:5])), "same shape"),
        (broken(lambda v: setattr(v, "key_pool", v.key_pool[:, :0])), "block_size >= 1"),
        (broken(lambda v: setattr(v, "key_pool", v.key_pool[..., 0])), "4 dimensions"),
        (broken(lambda v: setattr(v, "value_pool", v.value_pool.astype(np.int32))), "real float"),
        (broken(lambda v: setattr(v, "kv_pools", lambda: [v.key_pool, v.value_pool])), "kv_pools"),
        (broken(lambda v: setattr(v, "key_pool", np.ones((6, 4, 3, 3), np.float32))), "Hkv"),
    ],
)
def test_malformed_paged_views_raise(view, match):
    q_batch = np.ones((2, 4, 3), np.float32)
    with pytest.raises(AttentionError, match=match):
        paged_attention_numpy(q_batch, view)


@pytest.mark.parametrize(
    "q_shape, match", [((2, 4, 5), "head_dim"), ((2, 3, 3), "multiple"), ((2, 0, 3), "head"), ((4, 3), "3 dimensions")]
)
def test_malformed_queries_raise(q_shape, match):
    with pytest.raises(AttentionError, match=match):
        paged_attention_numpy(np.ones(q_shape, np.float32), hand_view())


@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_extra_memory_does_not_grow_with_pool_or_length(block_size):
    q_batch = np.random.default_rng(7).standard_normal((4, 4, 32)).astype(np.float32)
    peaks = []
    for tokens_per_sequence in (512, 8192):
        cache = PagedKvCache(
            num_blocks=4 * tokens_per_sequence // block_size + 1, block_size=block_size, num_kv_heads=1, head_dim=32
        )
        seqs = [cache.new_sequence() for _ in range(4)]
        for seq in seqs:
            cache.append(seq, np.zeros((tokens_per_sequence, 1, 32)), np.zeros((tokens_per_sequence, 1, 32)))
        view = cache.view(seqs)
        peaks.append(peak_during(lambda: paged_attention_numpy(q_batch, view, return_lse=True)))
    # a 16x deeper cache in a 16x larger pool: the same scratch (a gathered copy would be 4 x 8192 x 32 floats)
    assert peaks[1] < 1.5 * peaks[0] + 4096, peaks
