"""Fuzz the compiled entry points with malformed and odd inputs (run by test_fuzz.py in a subprocess).

Every call must either raise AttentionError or return the right answer; a crash (segfault) kills
this process, which the parent test sees as a non-zero exit code. Prints a one-line summary.
"""

import argparse
import sys
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashdecode import AttentionError, KvSlot, ListKvView, batched_flash_attention, flash_attention_forward
from flashdecode.batching import batched_reference
from flashdecode.naive import attention_reference
from flashdecode.paged import gather_tokens, paged_attention_numpy
from flashdecode.variants import batched_variant_reference

DTYPES = [np.float16, np.float32, np.float64, np.longdouble, np.int32, np.int64, np.bool_, np.complex64, object]
outcomes = Counter()
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--examples", type=int, default=300, help="hypothesis examples per entry point")
ARGS = parser.parse_args()
FUZZ = settings(
    max_examples=ARGS.examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@st.composite
def arrays(draw, max_side=70):
    """Arrays of any rank, dtype and layout: negative, zero and gapped strides, read-only, huge fake shapes."""
    ndim = draw(st.sampled_from([0, 1, 2, 3, 3, 3, 3, 4]))
    shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    base = rng.standard_normal(shape).astype(dtype) if dtype is not object else np.full(shape, None, object)
    layouts = ["c", "fortran", "reversed", "gapped", "broadcast", "readonly", "huge", "list", "byteswapped"]
    layout = draw(st.sampled_from(layouts))
    if layout == "fortran":
        return np.asfortranarray(base)
    if layout == "reversed" and ndim:
        return base[::-1]
    if layout == "gapped" and ndim:
        return np.repeat(base, 2, axis=-1)[..., ::2]
    if layout == "broadcast" and ndim:
        return np.broadcast_to(base[:1] if shape[0] else base, shape)
    if layout == "readonly":
        base.flags.writeable = False
        return base
    if layout == "huge" and ndim == 3:
        # an absurdly large shape backed by one element: must be rejected or handled, never read out of bounds
        return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(2**40, 3, 5), strides=(0, 0, 0))
    if layout == "list":
        return base.tolist()
    if layout == "byteswapped" and dtype is not object:  # the same numbers, bytes in the other order
        return base.astype(base.dtype.newbyteorder())
    return base


class FuzzView:
    """A view whose answers may be wrong in every way a buggy engine could get them wrong."""

    def __init__(self, count, positions, pairs):
        self.count, self.positions, self.pairs = count, positions, pairs

    def slot_count(self):
        return self.count

    def position(self, slot):
        return self.positions[slot % len(self.positions)]

    def kv_for_slot(self, slot):
        return self.pairs[slot % len(self.pairs)]


positions = st.one_of(st.integers(-3, 80), st.just(2**62), st.just(-(2**62)), st.sampled_from([None, 1.5, "3", True]))
pair = st.one_of(st.tuples(arrays(), arrays()), st.none(), arrays(), st.tuples(arrays(), arrays(), arrays()))
views = st.one_of(
    st.builds(
        FuzzView,
        st.one_of(st.integers(0, 4), st.just(2**40), st.sampled_from([-1, None, 2.0])),
        st.lists(positions, min_size=1, max_size=4),
        st.lists(pair, min_size=1, max_size=3),
    ),
    st.sampled_from([None, 3, "view", [], object()]),
)
scales = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["1", 0, -1.0, True]))
threads = st.one_of(st.none(), st.integers(-2, 4), st.sampled_from([2**31, 2**62, 1.5]))
splits = st.one_of(st.none(), st.integers(-2, 100), st.sampled_from([2**62, 0.5]))


def judge(call, reference, must_answer=False):
    """Run `call`; AttentionError is fine (unless the input is well formed: must_answer), a result must match
    `reference`, anything else fails."""
    try:
        result = call()
    except AttentionError:
        if must_answer:
            raise
        outcomes["AttentionError"] += 1
        return
    except MemoryError:  # a valid but absurdly large request (e.g. 2**40 fake queries)
        outcomes["MemoryError"] += 1
        return
    out, lse = result
    ref, ref_lse = reference()
    finite = np.isfinite(ref)
    assert out.dtype == np.float32 and out.shape == ref.shape and lse.shape == ref_lse.shape
    if finite.all() and np.isfinite(ref_lse).all() and out.size:
        scale = max(np.abs(ref).max(), 1e-30)
        assert np.abs(out - ref).max() / scale < 2e-3, "wrong answer"  # float16 inputs allowed 2e-3
    outcomes["answer"] += 1


backends = st.sampled_from(["simd", "cython"])  # both compiled tile-kernel sets


@FUZZ
@given(arrays(), views, scales, threads, splits, backends)
def fuzz_batched(q_batch, view, scale, num_threads, split_size, backend):
    judge(
        lambda: batched_flash_attention(
            q_batch, view, scale, return_lse=True, num_threads=num_threads, split_size=split_size, backend=backend
        ),
        lambda: batched_reference(q_batch, view, scale),
    )


@FUZZ
@given(arrays(), arrays(), arrays(), scales, st.booleans(), threads, splits, backends)
def fuzz_forward(q, k, v, scale, causal, num_threads, split_size, backend):
    judge(
        lambda: flash_attention_forward(
            q, k, v, scale, causal, return_lse=True, num_threads=num_threads, split_size=split_size, backend=backend
        ),
        lambda: attention_reference(q, k, v, scale, causal),
    )


@FUZZ
@given(
    st.integers(1, 5),
    st.lists(st.integers(0, 40), min_size=1, max_size=5),
    st.integers(0, 40),
    threads,
    splits,
    backends,
)
def fuzz_valid_views(num_kv_heads, lengths, spare, num_threads, split_size, backend):
    """Well-formed ragged batches (so the fuzz also reaches the kernel, not just the checks)."""
    rng = np.random.default_rng(sum(lengths) + spare)
    keys = [rng.standard_normal((n + spare, num_kv_heads, 8)).astype(np.float32)[::-1] for n in lengths]
    view = ListKvView([KvSlot(b, b, n) for b, n in enumerate(lengths)], keys, [k[:, :, ::-1] for k in keys])
    q_batch = rng.standard_normal((len(lengths), 2 * num_kv_heads, 8))
    judge(
        lambda: batched_flash_attention(
            q_batch, view, return_lse=True, num_threads=num_threads, split_size=split_size, backend=backend
        ),
        lambda: batched_reference(q_batch, view),
    )


@FUZZ
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=4),
    st.one_of(st.none(), st.integers(-2, 50)),
    st.sampled_from([None, 0.0, -1.0, 3.0, float("nan"), True]),
    st.sampled_from([None, "ok", "short", "inf"]),
    st.sampled_from([None, "ok", "nan"]),
    st.one_of(st.none(), st.lists(st.integers(-1, 45), max_size=5)),
    threads,
    backends,
)
def fuzz_variants(lengths, window_left, softcap, sinks, slopes, query_lens, num_threads, backend):
    """Valid and invalid variants (chapter 09) on well-formed batches: an AttentionError or the reference's answer."""
    rng = np.random.default_rng(sum(lengths))
    keys = [rng.standard_normal((n, 2, 8)).astype(np.float32) for n in lengths]
    view = ListKvView([KvSlot(b, b, n) for b, n in enumerate(lengths)], keys, keys)
    per_head = {"ok": rng.standard_normal(4), "short": np.ones(3), "inf": np.full(4, np.inf), "nan": np.full(4, np.nan)}
    variants = dict(
        window_left=window_left, softcap=softcap, sinks=per_head.get(sinks), alibi_slopes=per_head.get(slopes)
    )
    rows = len(lengths) if query_lens is None else max(0, sum(query_lens))
    q_batch = rng.standard_normal((rows, 4, 8))
    judge(
        lambda: batched_flash_attention(
            q_batch, view, return_lse=True, num_threads=num_threads, backend=backend, query_lens=query_lens, **variants
        ),
        lambda: batched_variant_reference(q_batch, view, query_lens=query_lens, **variants),
    )


class FuzzPagedView(FuzzView):
    """A paged view whose pools, block tables and positions may be wrong in every way."""

    def __init__(self, count, positions, pools, tables):
        super().__init__(count, positions, [None])
        self.pools, self.tables = pools, tables

    def kv_pools(self):
        return self.pools

    def block_table(self, slot):
        return self.tables[slot % len(self.tables)]

    def kv_for_slot(self, slot):
        """The gathered copy, for the reference; asked for only once the entry point has accepted the view."""
        return tuple(gather_tokens(pool, self.block_table(slot), self.position(slot)) for pool in self.pools)


# Entry points that read paged views by their block tables: chapter 07's numpy walk and the compiled kernel.
PAGED_ENTRY_POINTS = [
    lambda q_batch, view, scale: paged_attention_numpy(q_batch, view, scale, return_lse=True),
    lambda q_batch, view, scale: batched_flash_attention(q_batch, view, scale, return_lse=True),
]
tables = st.one_of(
    st.lists(st.integers(-1, 6), max_size=8),
    arrays(),
    st.lists(st.one_of(st.integers(-3, 12), st.just(2**62), st.none()), max_size=8),
)
pool_shapes = st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 2), st.sampled_from([1, 3, 8]))
# well-shaped pools, so that some calls get past the shape checks to the tables and positions
random_pools = pool_shapes.map(lambda shape: tuple(np.random.default_rng(sum(shape)).standard_normal((2,) + shape)))
paged_views = st.builds(
    FuzzPagedView,
    st.one_of(st.integers(0, 4), st.sampled_from([2**40, -1, None])),
    st.lists(st.one_of(st.integers(0, 12), positions), min_size=1, max_size=4),
    st.one_of(random_pools, st.tuples(arrays(max_side=9), arrays(max_side=9)), arrays(max_side=9), st.none()),
    st.lists(tables, min_size=1, max_size=3),
)


@FUZZ
@given(st.data(), paged_views, scales, st.sampled_from(PAGED_ENTRY_POINTS))
def fuzz_paged(data, view, scale, attend):
    """Malformed paged views; when the view's slot count and pools allow it, queries shaped to get past the
    first checks, so the tables and positions are checked too."""
    fits = (
        isinstance(view.count, int)
        and 0 <= view.count <= 4
        and isinstance(view.pools, tuple)
        and getattr(view.pools[0], "ndim", 0) == 4
    )
    q_batch = np.ones((view.count, 2, view.pools[0].shape[-1]), np.float32) if fits else data.draw(arrays())
    judge(lambda: attend(q_batch, view, scale), lambda: batched_reference(q_batch, view, scale))


@FUZZ
@given(
    st.integers(1, 4),
    st.integers(1, 20),
    st.lists(st.integers(0, 60), min_size=1, max_size=5),
    st.sampled_from(["c", "reversed", "fortran", "float16"]),
    st.integers(0, 2**16),
)
def fuzz_valid_paged_views(num_kv_heads, block_size, lengths, layout, seed):
    """Well-formed paged views over strided or float16 pools, tables naming any block (repeats allowed), through
    every entry point that takes a paged view, the compiled one included."""
    rng = np.random.default_rng(seed)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 2
    pools = [rng.standard_normal((num_blocks, block_size, num_kv_heads, 8)) for _ in range(2)]
    pools = [
        {"c": p, "reversed": p[::-1], "fortran": np.asfortranarray(p), "float16": p.astype(np.float16)}[layout]
        for p in pools
    ]
    block_tables = [rng.integers(0, num_blocks, -(-n // block_size) + int(rng.integers(0, 3))) for n in lengths]
    view = FuzzPagedView(len(lengths), lengths, tuple(pools), block_tables)
    q_batch = rng.standard_normal((len(lengths), 2 * num_kv_heads, 8))
    for attend in PAGED_ENTRY_POINTS:
        judge(lambda: attend(q_batch, view, None), lambda: batched_reference(q_batch, view), must_answer=True)


def main():
    for target in (fuzz_batched, fuzz_forward, fuzz_valid_views, fuzz_variants, fuzz_paged, fuzz_valid_paged_views):
        target()
    total = sum(outcomes.values())
    print(
        f"fuzz: {total} inputs, {outcomes['AttentionError']} AttentionError, "
        f"{outcomes['MemoryError']} MemoryError, {outcomes['answer']} correct answers"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
