"""Helpers shared by the paged-cache tests: a PagedKvCache driven next to a plain model of its contents."""

import numpy as np

from flashdecode.api import batched_flash_attention
from flashdecode.naive import attention_reference
from flashdecode.paged import PagedKvCache, paged_attention_numpy

# The backends that read paged views: chapter 07's numpy walk, and the compiled kernel's block-table walk with
# each tile-kernel set (and the generic numpy backend, which reads the views' gathered copies).
ATTEND = {
    "numpy": lambda q_batch, view, scale: paged_attention_numpy(q_batch, view, scale, return_lse=True),
    **{
        backend: (
            lambda q_batch, view, scale, backend=backend: batched_flash_attention(
                q_batch, view, scale, return_lse=True, backend=backend
            )
        )
        for backend in ("simd", "cython", "auto")
    },
}
PAGED_BACKENDS = list(ATTEND)


class ModelledCache:
    """A PagedKvCache and, beside it, what each live sequence should hold: one (T, Hkv, D) array of keys
    and one of values per sequence id, grown by plain concatenation. Every token is random, so a token read
    from the wrong place (another sequence's block, a stale copy) differs from the model."""

    def __init__(self, num_blocks, block_size, num_kv_heads=2, head_dim=8, seed=0):
        self.cache = PagedKvCache(num_blocks, block_size, num_kv_heads, head_dim)
        self.rng = np.random.default_rng(seed)
        self.keys, self.values = {}, {}

    def tokens(self, count):
        shape = (count,) + self.cache.keys.shape[2:]
        return self.rng.standard_normal(shape).astype(np.float32), self.rng.standard_normal(shape).astype(np.float32)

    def new(self, count=0):
        seq = self.cache.new_sequence()
        empty = np.zeros((0,) + self.cache.keys.shape[2:], np.float32)
        self.keys[seq], self.values[seq] = empty, empty
        self.append(seq, count)
        return seq

    def append(self, seq, count):
        k, v = self.tokens(count)
        self.cache.append(seq, k, v)  # raises before the model changes if the cache refuses
        self.keys[seq] = np.concatenate([self.keys[seq], k])
        self.values[seq] = np.concatenate([self.values[seq], v])

    def fork(self, seq):
        child = self.cache.fork(seq)
        self.keys[child], self.values[child] = self.keys[seq], self.values[seq]
        return child

    def free(self, seq):
        self.cache.free(seq)
        del self.keys[seq], self.values[seq]

    def reference(self, q_batch, seqs, softmax_scale=None):
        """float64 attention of q_batch[b] over the model's tokens of seqs[b]: (out (B, H, D), lse (B, H))."""
        out = np.zeros(q_batch.shape)
        lse = np.full(q_batch.shape[:2], -np.inf)
        for b, seq in enumerate(seqs):
            if len(self.keys[seq]):
                out_b, lse_b = attention_reference(q_batch[b : b + 1], self.keys[seq], self.values[seq], softmax_scale)
                out[b], lse[b] = out_b[0], lse_b[0]
        return out, lse


def blocks_used(cache):
    """Tokens in use in each block: the most any sequence holding it keeps there (0 for a free block)."""
    used = np.zeros(cache.num_blocks, np.int64)
    for seq, table in cache.block_tables.items():
        position = cache.positions[seq]
        for number, block in enumerate(table):
            used[block] = max(used[block], min(cache.block_size, position - number * cache.block_size))
    return used


def fill_unused_with_nan(cache):
    """NaN into every free block and every unused tail slot: a kernel that reads one of them returns NaN."""
    for block, used in enumerate(blocks_used(cache)):
        cache.keys[block, used:] = np.nan
        cache.values[block, used:] = np.nan


def cache_state(cache):
    """Everything a PagedKvCache holds, copied, for comparing before and after a call."""
    return {
        "keys": cache.keys.copy(),
        "values": cache.values.copy(),
        "ref_counts": cache.ref_counts.copy(),
        "free_blocks": list(cache.free_blocks),
        "next_sequence": cache.next_sequence,
        "block_tables": {seq: list(table) for seq, table in cache.block_tables.items()},
        "positions": dict(cache.positions),
    }


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for name in before:
        if isinstance(before[name], np.ndarray):
            assert np.array_equal(before[name], after[name], equal_nan=True), name
        else:
            assert before[name] == after[name], name


def assert_consistent(cache, model_keys=None, model_values=None):
    """The bookkeeping invariants, checked from the block tables alone, and (with a model) the contents."""
    holders = np.zeros(cache.num_blocks, np.int64)
    for seq, table in cache.block_tables.items():
        assert len(table) == -(-cache.positions[seq] // cache.block_size), (seq, table, cache.positions[seq])
        np.add.at(holders, np.asarray(table, dtype=np.intp), 1)
    np.testing.assert_array_equal(cache.ref_counts, holders)  # every count is the number of holders
    assert len(set(cache.free_blocks)) == len(cache.free_blocks)  # no block on the free list twice
    assert set(cache.free_blocks) == set(np.flatnonzero(holders == 0).tolist())
    assert cache.num_free_blocks + np.count_nonzero(holders) == cache.num_blocks
    if model_keys is not None:
        assert set(cache.block_tables) == set(model_keys)
        view = cache.view(sorted(model_keys))
        for slot, seq in enumerate(sorted(model_keys)):
            k, v = view.kv_for_slot(slot)
            np.testing.assert_array_equal(k, model_keys[seq])
            np.testing.assert_array_equal(v, model_values[seq])
