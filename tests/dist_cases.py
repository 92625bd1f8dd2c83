"""flashdecode.dist: a cache sharded over Ray actors gives the in-process kernel's answer; a failed or silent
shard is an AttentionError naming it within the timeout, never a hang or a partial answer; restore recovers.

Run by tests/test_dist.py in a Python process of their own (see there why). One local Ray (two CPUs) for the
whole module, shut down at the end, with a check that its processes are gone. Ray is in the dev extra: these
tests never skip themselves.
"""

import contextlib
import io
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import rel_err

from flashdecode import AttentionError, KvCache, batched_flash_attention
from flashdecode.dist import PagedSlots, ShardedKvCache, place_tokens, start_local_ray, step_traffic_bytes, tree_merge

LENGTHS = [0, 1, 37, 250, 333]  # per slot: an empty slot, a single token, and longer ones
NUM_KV_HEADS, HEAD_DIM = 2, 16


def descendants(pid):
    """Pids of every process below `pid` (from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def local_ray():
    before = set(descendants(os.getpid()))
    started = start_local_ray(num_cpus=2)
    ray_processes = set(descendants(os.getpid())) - before
    yield started
    ray.shutdown()
    deadline = time.monotonic() + 15
    while (
        left := [
            p
            for p in ray_processes
            if Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        ]
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray processes still running after ray.shutdown(): {left}"


def filled(cache, rng, lengths=LENGTHS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM):
    """Append each slot's tokens to `cache` in uneven chunks (a prompt, then single decode tokens) and to an
    in-process KvCache; return the KvCache."""
    local = KvCache(len(lengths), max(lengths) + 8, num_kv_heads, head_dim)
    for slot, n in enumerate(lengths):
        k = rng.standard_normal((n, num_kv_heads, head_dim)).astype(np.float32)
        v = rng.standard_normal((n, num_kv_heads, head_dim)).astype(np.float32)
        local.append(slot, k, v)
        cuts = [0, n // 2, n - 1, n] if n > 2 else [0, n]
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                cache.append(slot, k[a:b], v[a:b])
    return local


def assert_same_step(cache, local, rng, num_heads, slots=None):
    slots = list(range(local.positions.size)) if slots is None else slots
    q = rng.standard_normal((len(slots), num_heads, HEAD_DIM)).astype(np.float32)
    ref_out, ref_lse = batched_flash_attention(q, local.view(slots), return_lse=True)
    out, lse = cache.decode(q, slots, return_lse=True)
    assert out.dtype == lse.dtype == np.float32
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    return q, out, lse


@pytest.mark.parametrize(
    "num_shards, capacity, block_size, storage",
    [
        (1, 340, None, KvCache),  # one shard: the kernel behind one round trip
        (2, [100, 250], None, PagedSlots),  # uneven, filled in order; each shard a paged cache (chapter 07)
        (3, [120, 0, 230], None, KvCache),  # a shard with no room at all
        (4, 96, 16, KvCache),  # blocks of 16 dealt round-robin
    ],
    ids=["1-shard", "2-uneven-paged", "3-one-empty", "4-round-robin"],
)
def test_sequence_sharding_equals_the_kernel(local_ray, num_shards, capacity, block_size, storage):
    rng = np.random.default_rng(num_shards)
    with ShardedKvCache(
        len(LENGTHS),
        capacity,
        NUM_KV_HEADS,
        HEAD_DIM,
        num_shards=num_shards,
        block_size=block_size,
        timeout=20,
        storage=storage,
    ) as cache:
        local = filled(cache, rng)
        assert [cache.position(s) for s in range(len(LENGTHS))] == LENGTHS
        assert cache.positions.sum(axis=0).tolist() == LENGTHS
        with pytest.raises(AttentionError, match=r"shard 0 has no snapshot to restore from"):
            cache.restore(0)
        assert_same_step(cache, local, rng, num_heads=8)
        assert_same_step(cache, local, rng, num_heads=2, slots=[4, 0, 3])  # MHA, a subset, out of order
        _, out, lse = assert_same_step(cache, local, rng, num_heads=4, slots=[0])  # no shard holds anything
        assert not out.any() and np.isneginf(lse).all()
        cache.reset(3)  # freed, then reused by a new request
        local.reset(3)
        k, v = rng.standard_normal((2, 40, NUM_KV_HEADS, HEAD_DIM))
        cache.append(3, k, v)
        local.append(3, k, v)
        assert cache.position(3) == 40
        assert_same_step(cache, local, rng, num_heads=8)


def test_head_sharding_equals_the_kernel(local_ray):
    rng = np.random.default_rng(7)
    lengths = [5, 0, 300]
    with ShardedKvCache(3, 310, 3, HEAD_DIM, num_shards=2, shard_by="head", timeout=20) as cache:
        assert cache.head_bounds == [0, 2, 3]  # uneven: kv heads {0, 1} and {2}
        local = filled(cache, rng, lengths, num_kv_heads=3)
        assert [cache.position(s) for s in range(3)] == lengths
        for num_heads in (3, 6, 12):  # MHA, GQA groups of 2 and of 4
            assert_same_step(cache, local, rng, num_heads)


@pytest.fixture(scope="module")
def pair(local_ray):
    """Two sequence shards holding a small batch, snapshotted, and the kernel's answer for it."""
    rng = np.random.default_rng(11)
    cache = ShardedKvCache(3, 200, NUM_KV_HEADS, HEAD_DIM, num_shards=2, block_size=32, timeout=10)
    local = filled(cache, rng, lengths=[90, 150, 3])
    assert (cache.positions.sum(axis=1) > 0).all()  # both shards hold tokens
    cache.snapshot()
    q = rng.standard_normal((3, 4, HEAD_DIM)).astype(np.float32)
    yield cache, local, q, cache.decode(q, range(3), return_lse=True)
    cache.close()


def test_bad_input_is_an_attention_error_naming_it(pair):
    cache = pair[0]  # 3 slots, 2 shards of 200 tokens, Hkv=2, D=16
    positions = cache.positions.copy()
    cases = [
        (lambda: cache.decode(np.zeros((3, 4, 7)), [0, 1, 2]), r"wanted \(3, H, 16\) for 3 slots; got \(3, 4, 7\)"),
        (lambda: cache.decode(np.zeros((3, 4, 16)), [0, 1]), r"wanted \(2, H, 16\) for 2 slots; got \(3, 4, 16\)"),
        (lambda: cache.decode(np.zeros((2, 3, 16)), [0, 1]), r"H=3 heads, not a multiple of the Hkv=2"),
        (lambda: cache.decode(np.zeros((1, 4, 16)), [3]), r"slot_index must be an integer in \[0, 3\); got 3"),
        (lambda: cache.decode(np.zeros((1, 4, 16), np.int32), [0]), r"q_batch must be a real float array"),
        (lambda: cache.decode(np.zeros((1, 4, 16)), [0], softmax_scale=np.nan), r"softmax_scale"),
        (lambda: cache.decode(np.zeros((1, 4, 16)), [0], method="ping"), r"method must be 'attend' or 'echo'"),
        (lambda: cache.append(0, np.zeros((3, 2, 4)), np.zeros((3, 2, 4))), r"\(T, 2, 16\).*\(3, 2, 4\)"),
        (lambda: cache.append(0, np.zeros((3, 2, 16)), np.zeros((2, 2, 16))), r"got k \(3, 2, 16\) and v \(2, 2, 16\)"),
        (lambda: cache.append(0, np.zeros((400, 2, 16)), np.zeros((400, 2, 16))), r"400 new tokens do not fit"),
        (lambda: cache.restore(2), r"shard must be an integer in \[0, 2\); got 2"),
        (lambda: ShardedKvCache(2, 10, 2, 8, num_shards=3, shard_by="head"), r"num_shards must be <= num_kv_heads=2"),
        (lambda: ShardedKvCache(2, 10, 2, 8, shard_by="layer"), r"shard_by must be one of"),
        (lambda: ShardedKvCache(2, [10, 10, 10], 2, 8, num_shards=2), r"capacity must be an int, or one int per shard"),
        (lambda: ShardedKvCache(2, 10, 2, 8, timeout=0), r"timeout must be a positive number of seconds; got 0"),
        (lambda: ShardedKvCache(2, 10, 2, 8, block_size=0), r"block_size must be an integer >= 1"),
        (lambda: ShardedKvCache(2, 10, 2, 8, start_timeout=-1), r"start_timeout must be a positive number"),
    ]
    for call, message in cases:
        with pytest.raises(AttentionError, match=message):
            call()
    assert np.array_equal(cache.positions, positions)  # nothing was half-written


def test_a_shard_killed_during_a_step_is_named_and_restored(pair):
    cache, _, q, (out, lse) = pair
    cache.actors[1].__ray_call__.remote(lambda worker: time.sleep(5))  # shard 1 busy: the step waits for it
    threading.Timer(0.3, ray.kill, [cache.actors[1]]).start()  # and it dies in the middle of the step
    started = time.perf_counter()
    with pytest.raises(AttentionError, match=r"decode step failed: shard 1's actor died \(ActorDiedError"):
        cache.decode(q, range(3))
    assert time.perf_counter() - started < cache.timeout + 2
    with pytest.raises(AttentionError, match=r"shard 1's actor died"):  # no answer from a dead shard, ever
        cache.decode(q, range(3))
    cache.restore(1)
    again_out, again_lse = cache.decode(q, range(3), return_lse=True)
    assert np.array_equal(again_out, out) and np.array_equal(again_lse, lse)


def test_a_silent_shard_times_out_naming_it(pair):
    cache, _, q, (out, _) = pair
    cache.actors[0].__ray_call__.remote(lambda worker: time.sleep(4))  # alive, but does not answer
    cache.timeout, started = 1.0, time.perf_counter()
    try:
        with pytest.raises(AttentionError, match=r"shard 0 did not answer within the timeout of 1 s"):
            cache.decode(q, range(3))
        assert 1.0 <= time.perf_counter() - started < 1.0 + 2.5
    finally:
        cache.timeout = 10.0
    assert np.array_equal(cache.decode(q, range(3)), out)  # it answers again once free


def test_restore_replays_the_appends_made_since_the_snapshot(pair):
    cache, local, q, _ = pair
    rng = np.random.default_rng(5)
    for slot in range(3):  # a decode step's new tokens, after the snapshot
        k, v = rng.standard_normal((2, 1, NUM_KV_HEADS, HEAD_DIM))
        cache.append(slot, k, v)
        local.append(slot, k, v)
    ref_out, ref_lse = batched_flash_attention(q, local.view(range(3)), return_lse=True)
    for shard in (0, 1):
        ray.kill(cache.actors[shard])
    for shard in (0, 1):
        cache.restore(shard)
    out, lse = cache.decode(q, range(3), return_lse=True)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5


def test_tree_merge_and_placement_without_ray():
    rng = np.random.default_rng(0)
    outs, lses = rng.standard_normal((7, 2, 3, 5)), rng.standard_normal((7, 2, 3))
    lses[2] = -np.inf  # an empty part counts for nothing
    levels = []
    tree = tree_merge(list(outs), list(lses), levels=levels)
    flat = tree_merge(list(outs), list(lses), fan_in=7)
    assert levels == [7, 4, 2, 1]
    assert rel_err(tree[0], flat[0]) < 1e-12 and rel_err(tree[1], flat[1]) < 1e-12
    assert place_tokens(0, 7, [3, 0, 5])[1].tolist() == [0, 0, 0, 2, 2, 2, 2]
    assert place_tokens(5, 6, [9, 9], block_size=4)[1].tolist() == [1, 1, 1, 0, 0, 0]
    assert step_traffic_bytes(2, 32, 128) == (2 * 32 * 128 * 4, 2 * 32 * 129 * 4)
    with pytest.raises(AttentionError, match=r"do not fit"):
        place_tokens(0, 9, [3, 5])


def test_readme_example_runs(local_ray):
    """The README's Ray example is fenced `py`, not `python`: tests/test_readme.py runs the `python` blocks in
    the main test process, which must not start Ray (see tests/test_dist.py)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    code = next(block for block in re.findall(r"```py\n(.*?)```", readme, re.S) if "flashdecode.dist" in block)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().strip() == "[2500 2500] True"
