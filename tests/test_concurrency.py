"""The kernel releases the GIL, and concurrent calls on shared read-only caches agree with serial ones."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flashdecode import KvCache, batched_flash_attention, flash_attention_forward


def shared_cache(rng, num_slots=6, length=3000):
    cache = KvCache(num_slots=num_slots, capacity=length, num_kv_heads=2, head_dim=64)
    for slot in range(num_slots):
        n = length // (slot + 1)
        cache.append(slot, rng.standard_normal((n, 2, 64)), rng.standard_normal((n, 2, 64)))
    cache.keys.flags.writeable = False  # shared and read-only, as in a serving engine
    cache.values.flags.writeable = False
    return cache


def test_threads_on_shared_cache_match_serial(rng):
    cache = shared_cache(rng)
    queries = [rng.standard_normal((6, 8, 64)).astype(np.float32) for _ in range(8)]
    views = [cache.view(rng.permutation(6)) for _ in range(8)]
    serial = [batched_flash_attention(q, view, num_threads=1) for q, view in zip(queries, views)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            concurrent = list(pool.map(lambda args: batched_flash_attention(*args, num_threads=1), zip(queries, views)))
            for a, b in zip(serial, concurrent):
                np.testing.assert_array_equal(a, b)  # bit-identical: no shared scratch between calls


def test_kernel_releases_the_gil(rng):
    """A pure-Python thread keeps running *inside* one long kernel call.

    With the GIL held, the other thread could not take a single step between the call's
    start and end; released, it stamps the clock all the way through.
    """
    q = rng.standard_normal((1, 8, 128)).astype(np.float32)
    k = rng.standard_normal((300_000, 1, 128)).astype(np.float32)
    flash_attention_forward(q[:, :, :8], k[:10, :, :8], k[:10, :, :8])  # warm up
    done, stamps = threading.Event(), []

    def stamp_the_clock():
        while not done.is_set():
            for _ in range(100):
                pass
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=stamp_the_clock)
    thread.start()
    time.sleep(0.02)
    start = time.perf_counter()
    flash_attention_forward(q, k, k, num_threads=1)
    end = time.perf_counter()
    done.set()
    thread.join()
    margin = 0.1 * (end - start)  # skip the Python-level checks at either end of the call
    inside = [t for t in stamps if start + margin < t < end - margin]
    assert end - start > 0.01
    assert len(inside) > 100, (len(inside), end - start)
