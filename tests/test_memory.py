"""Memory: the kernel's extra allocation does not grow with the cache, and repeated calls do not leak."""

import resource
import tracemalloc

import numpy as np

from flashdecode import KvCache, batched_flash_attention, flash_attention_forward


def peak_during(call):
    call()  # warm up: first-call allocations are not the steady state
    tracemalloc.start()
    call()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_extra_memory_does_not_grow_with_cache_length(rng):
    q = rng.standard_normal((1, 8, 128)).astype(np.float32)
    peaks = {}
    for kv_len in (4_096, 65_536):
        kv = np.zeros((kv_len, 1, 128), np.float32)
        for split_size in (None, 512):  # automatic split: a bounded number of parts; fixed: L / 512 parts
            peaks[kv_len, split_size] = peak_during(lambda: flash_attention_forward(q, kv, kv, split_size=split_size))
    assert peaks[65_536, None] < 1.5 * peaks[4_096, None] + 4096, peaks
    # with a fixed split size the number of parts grows with L: (L / 512) x H x D floats, still far below
    # the cache itself (L x D floats x 2)
    assert peaks[65_536, 512] < 65_536 * 128 * 4 * 2 / 20, peaks


def test_batched_extra_memory_independent_of_depth(rng):
    q_batch = rng.standard_normal((4, 8, 64)).astype(np.float32)
    peaks = []
    for capacity in (4_096, 65_536):
        cache = KvCache(num_slots=4, capacity=capacity, num_kv_heads=2, head_dim=64)
        cache.positions[:] = capacity
        peaks.append(peak_during(lambda: batched_flash_attention(q_batch, cache.view(range(4)))))
    assert peaks[1] < 1.5 * peaks[0] + 4096, peaks


def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def test_repeated_calls_do_not_leak(rng):
    cache = KvCache(num_slots=3, capacity=256, num_kv_heads=2, head_dim=32)
    for slot, n in enumerate([0, 100, 256]):
        cache.append(slot, rng.standard_normal((n, 2, 32)), rng.standard_normal((n, 2, 32)))
    q_batch = rng.standard_normal((3, 4, 32)).astype(np.float32)
    view = cache.view(range(3))
    for _ in range(500):  # reach the allocator's steady state
        batched_flash_attention(q_batch, view, return_lse=True)
    before = rss_kib()
    for _ in range(10_000):
        batched_flash_attention(q_batch, view, return_lse=True)
    grown = rss_kib() - before
    # a leak of even one 384-byte output per call would be 3.7 MiB here
    assert grown < 1024, f"RSS grew {grown} KiB over 10,000 calls"
