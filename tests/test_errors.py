"""The error contract: every malformed call raises AttentionError naming what it got and wanted."""

import numpy as np
import pytest
from conftest import BACKENDS

from flashdecode import (
    AttentionError,
    KvCache,
    KvSlot,
    ListKvView,
    batched_flash_attention,
    flash_attention_forward,
    merge_states,
)

f32 = lambda *shape: np.ones(shape, np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "q,k,v,kwargs,needles",
    [
        (f32(8, 64), f32(10, 2, 64), f32(10, 2, 64), {}, ["q", "(8, 64)", "(Lq, H, D)"]),
        (f32(1, 8, 64), f32(10, 2, 32), f32(10, 2, 32), {}, ["head_dim", "(10, 2, 32)", "64"]),
        (f32(1, 8, 64), f32(10, 3, 64), f32(10, 3, 64), {}, ["H=8", "Hkv=3", "multiple"]),
        (f32(1, 8, 64), f32(10, 0, 64), f32(10, 0, 64), {}, ["Hkv=0"]),
        (f32(1, 0, 64), f32(10, 2, 64), f32(10, 2, 64), {}, ["(1, 0, 64)", "H>=1"]),
        (f32(1, 8, 0), f32(10, 2, 0), f32(10, 2, 0), {}, ["(1, 8, 0)", "D>=1"]),
        (f32(1, 8, 64), f32(10, 2, 64), f32(9, 2, 64), {}, ["(10, 2, 64)", "(9, 2, 64)", "same shape"]),
        (f32(11, 8, 64), f32(10, 2, 64), f32(10, 2, 64), {"causal": True}, ["Lq=11", "Lkv=10"]),
        (np.ones((1, 8, 64), np.int32), f32(10, 2, 64), f32(10, 2, 64), {}, ["q", "int32", "float"]),
        (f32(1, 8, 64), np.ones((10, 2, 64), bool), f32(10, 2, 64), {}, ["k", "bool"]),
        (f32(1, 8, 64), f32(10, 2, 64), np.ones((10, 2, 64), np.complex64), {}, ["v", "complex64"]),
        (f32(1, 8, 64), "keys", f32(10, 2, 64), {}, ["k", "str"]),
        (None, f32(10, 2, 64), f32(10, 2, 64), {}, ["q", "NoneType"]),
        (f32(1, 8, 64), f32(10, 2, 64), f32(10, 2, 64), {"softmax_scale": float("nan")}, ["softmax_scale", "nan"]),
        (f32(1, 8, 64), f32(10, 2, 64), f32(10, 2, 64), {"softmax_scale": "0.1"}, ["softmax_scale", "'0.1'"]),
        (
            f32(1, 8, 64),
            f32(10, 2, 64),
            f32(10, 2, 64),
            {"softmax_scale": 1e300},
            ["softmax_scale", "1e+300", "float32"],
        ),
        (f32(1, 8, 64), f32(10, 2, 64), f32(10, 2, 64), {"softmax_scale": float("-inf")}, ["softmax_scale", "-inf"]),
    ],
)
def test_forward_errors(backend, q, k, v, kwargs, needles):
    with pytest.raises(AttentionError) as info:
        flash_attention_forward(q, k, v, backend=backend, **kwargs)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def view_of(lengths, num_kv_heads=2, head_dim=8, capacity=None):
    keys = [f32(capacity or n, num_kv_heads, head_dim) for n in lengths]
    return ListKvView([KvSlot(b, b, n) for b, n in enumerate(lengths)], keys, [k.copy() for k in keys])


class BadPosition:
    def __init__(self, position, keys=f32(4, 2, 8)):
        self._position, self._keys = position, keys

    def slot_count(self):
        return 1

    def position(self, slot):
        return self._position

    def kv_for_slot(self, slot):
        return self._keys, self._keys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "q_batch,view,needles",
    [
        (f32(3, 4, 8), view_of([1, 2]), ["slot_count()", "2", "(3, 4, 8)"]),
        (f32(2, 4, 8), object(), ["BatchedKvView", "object"]),
        (f32(2, 4, 8), [f32(1, 2, 8)], ["BatchedKvView", "list"]),
        (f32(1, 4, 8), BadPosition(-1), ["position(0)", "-1"]),
        (f32(1, 4, 8), BadPosition(5), ["position(0)", "5", "(4, 2, 8)"]),
        (f32(1, 4, 8), BadPosition(2.0), ["position(0)", "2.0"]),
        (f32(1, 4, 8), BadPosition(2, f32(4, 3, 8)), ["Hkv=3", "H=4"]),
        (f32(1, 4, 8), BadPosition(2, f32(4, 2, 16)), ["head_dim 16", "(4, 2, 16)"]),
        (f32(1, 4, 8), BadPosition(2, np.ones((4, 2, 8), np.int64)), ["int64", "slot 0"]),
        (f32(1, 4, 8), BadPosition(2, f32(4, 2)), ["slot 0", "(4, 2)"]),
        (
            f32(2, 4, 8),
            ListKvView([KvSlot(0, 0, 1), KvSlot(1, 1, 1)], [f32(1, 2, 8), f32(1, 1, 8)], [f32(1, 2, 8), f32(1, 1, 8)]),
            ["same number of kv heads", "slot 1"],
        ),
        (
            f32(1, 4, 8),
            ListKvView([KvSlot(0, 0, 3)], [f32(3, 2, 8)], [f32(2, 2, 8)]),
            ["position(0) is 3", "(2, 2, 8)"],
        ),
        (f32(4, 8), view_of([1]), ["q_batch", "(4, 8)", "(B, H, D)"]),
    ],
)
def test_batched_errors(backend, q_batch, view, needles):
    with pytest.raises(AttentionError) as info:
        batched_flash_attention(q_batch, view, backend=backend)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_list_view_and_cache_errors():
    with pytest.raises(AttentionError, match="2 slots, 1 key arrays"):
        ListKvView([KvSlot(0, 0, 1), KvSlot(1, 1, 1)], [f32(1, 1, 1)], [f32(1, 1, 1)])
    with pytest.raises(AttentionError, match=r"slots\[0\] must be a KvSlot"):
        ListKvView([(0, 0, 1)], [f32(1, 1, 1)], [f32(1, 1, 1)])
    cache = KvCache(2, 4, 1, 8)
    with pytest.raises(AttentionError, match=r"position 0 \+ 5 new tokens > capacity 4"):
        cache.append(0, f32(5, 1, 8), f32(5, 1, 8))
    with pytest.raises(AttentionError, match=r"slot_index must be an integer in \[0, 2\); got 2"):
        cache.append(2, f32(1, 1, 8), f32(1, 1, 8))
    with pytest.raises(AttentionError, match=r"slot_index .* got -1"):
        cache.view([-1])
    with pytest.raises(AttentionError, match=r"\(T, 1, 8\).*\(1, 1, 4\)"):
        cache.append(0, f32(1, 1, 4), f32(1, 1, 4))
    with pytest.raises(AttentionError, match="capacity must be an integer >= 0; got -3"):
        KvCache(1, -3, 1, 8)
    with pytest.raises(AttentionError, match="head_dim must be an integer >= 1; got 0"):
        KvCache(1, 3, 1, 0)
    assert cache.position(0) == 0  # a failed append wrote nothing


def test_other_argument_errors():
    q, k = f32(1, 2, 4), f32(3, 1, 4)
    with pytest.raises(AttentionError, match="backend must be one of .* got 'torch'"):
        flash_attention_forward(q, k, k, backend="torch")
    with pytest.raises(AttentionError, match="num_threads must be an integer >= 1; got 0"):
        flash_attention_forward(q, k, k, num_threads=0)
    with pytest.raises(AttentionError, match="split_size must be an integer >= 1; got 0"):
        flash_attention_forward(q, k, k, split_size=0)
    with pytest.raises(AttentionError, match=r"outputs \(2, 3, 4\) and lses \(3, 3\)"):
        merge_states(f32(2, 3, 4), f32(3, 3))
    assert issubclass(AttentionError, ValueError)
