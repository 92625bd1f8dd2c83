"""Property tests (hypothesis) of PagedKvCache: random programs of new / append / fork / free against a model.

After every operation: each live sequence's tokens equal the model's (a plain concatenation per sequence),
every reference count equals the number of block tables naming the block, the free list holds exactly the
blocks nobody holds, and free + held == num_blocks. An append is refused (AttentionError, nothing changed)
exactly when it needs more blocks than are free. At the end, attention over a random batch of the live
sequences (repeats allowed), with NaN in every free block and unused tail, matches the float64 reference.
"""

import numpy as np
import paged_helpers as paged
from conftest import property_settings, rel_err
from hypothesis import given
from hypothesis import strategies as st

from flashdecode import AttentionError

PROPERTY = property_settings(80)

append = st.tuples(st.just("append"), st.integers(0, 2**16), st.sampled_from([0, 1, 1, 1, 2, 5, 17]))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.integers(0, 30)),
        append,
        append,
        append,  # decoding is most of what a cache sees
        st.tuples(st.just("fork"), st.integers(0, 2**16)),
        st.tuples(st.just("free"), st.integers(0, 2**16)),
    ),
    min_size=10,
    max_size=60,
)


def blocks_needed(cache, seq, count):
    """Blocks an append of `count` tokens must take, worked out from the block tables alone: the new blocks
    past the last one, and a copy of the last one if it is partly filled and another table names it too."""
    table, position, size = cache.block_tables[seq], cache.positions[seq], cache.block_size
    new_blocks = -(-(position + count) // size) - len(table)
    shared_last = count > 0 and position % size and sum(t.count(table[-1]) for t in cache.block_tables.values()) > 1
    return new_blocks + bool(shared_last)


def run(model, program):
    """Apply `program` to the modelled cache, checking the invariants after every step."""
    cache = model.cache
    for op, *args in program:
        live = sorted(model.keys)
        if op == "new" or not live:
            count = args[0] if op == "new" else 1
            needed = -(-count // cache.block_size)
            seq = None
        else:
            seq = live[args[0] % len(live)]
            count = args[1] if op == "append" else 0
            needed = blocks_needed(cache, seq, count) if op == "append" else 0
        before = paged.cache_state(cache)
        if needed > cache.num_free_blocks:
            try:
                model.new(count) if seq is None else model.append(seq, count)
                raise AssertionError(f"{op} needing {needed} blocks with {cache.num_free_blocks} free did not raise")
            except AttentionError as exc:
                assert "out of blocks" in str(exc)
            if seq is None:  # the new, empty sequence exists; the refused prompt left no trace
                before["next_sequence"] += 1
                before["block_tables"][cache.next_sequence - 1], before["positions"][cache.next_sequence - 1] = [], 0
            paged.assert_same_state(before, paged.cache_state(cache))
        elif seq is None:
            model.new(count)
        elif op == "append":
            model.append(seq, count)
        elif op == "fork":
            model.fork(seq)
        else:
            model.free(seq)
        paged.assert_consistent(cache, model.keys, model.values)


@PROPERTY
@given(
    st.sampled_from([1, 2, 3, 4, 5, 16]),
    st.integers(0, 40),
    operations,
    st.integers(0, 2**32 - 1),
    st.lists(st.integers(0, 2**16), max_size=6),
    st.integers(1, 4),
    st.sampled_from(paged.PAGED_BACKENDS),
)
def test_random_programs_keep_the_cache_consistent(block_size, num_blocks, program, seed, picks, group, backend):
    model = paged.ModelledCache(num_blocks, block_size, num_kv_heads=2, head_dim=4, seed=seed % 1000)
    run(model, program)
    live = sorted(model.keys)
    seqs = [live[p % len(live)] for p in picks] if live else []
    paged.fill_unused_with_nan(model.cache)
    q_batch = np.random.default_rng(seed).standard_normal((len(seqs), 2 * group, 4)).astype(np.float32)
    out, lse = paged.ATTEND[backend](q_batch, model.cache.view(seqs), None)
    ref, ref_lse = model.reference(q_batch, seqs)
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4
