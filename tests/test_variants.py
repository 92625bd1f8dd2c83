"""The attention variants (chapter 09): every combination against the float64 reference, every backend, GQA groups
1-8; the error contract; and torch's SDPA with the equivalent explicit float mask as a cross-check."""

import itertools

import numpy as np
import pytest
from conftest import BACKENDS, rel_err, require_module

from flashdecode import AttentionError, KvCache, batched_flash_attention, flash_attention_forward
from flashdecode.variants import batched_variant_reference, variant_reference

WINDOWS = [None, 0, 5, 10_000]  # none, the key itself, a short one, longer than any cache
COMBINATIONS = list(itertools.product(WINDOWS, [None, 20.0], [False, True], [False, True]))


def variant_args(rng, num_heads, window_left, softcap, alibi, sinks):
    return dict(
        window_left=window_left,
        softcap=softcap,
        alibi_slopes=(2.0 ** -np.arange(1, num_heads + 1)).astype(np.float32) if alibi else None,
        sinks=rng.standard_normal(num_heads).astype(np.float32) if sinks else None,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window_left, softcap, alibi, sinks", COMBINATIONS)
def test_batched_every_combination(backend, window_left, softcap, alibi, sinks):
    rng = np.random.default_rng(7)
    for group in range(1, 9):  # every GQA group size 1-8, alternately with several queries per slot
        query_lens = None if group % 2 else [2, 0, 1, min(group, 6)]
        num_kv_heads, head_dim = 2, 24
        cache = KvCache(num_slots=4, capacity=300, num_kv_heads=num_kv_heads, head_dim=head_dim)
        for slot, n in enumerate([37, 0 if query_lens is None else 4, 290, 6]):
            cache.append(
                slot, rng.standard_normal((n, num_kv_heads, head_dim)), rng.standard_normal((n, num_kv_heads, head_dim))
            )
        rows = 4 if query_lens is None else sum(query_lens)
        q = (rng.standard_normal((rows, group * num_kv_heads, head_dim)) * 2).astype(np.float32)
        variants = variant_args(rng, group * num_kv_heads, window_left, softcap, alibi, sinks)
        view = cache.view(range(4))
        ref, ref_lse = batched_variant_reference(q, view, query_lens=query_lens, **variants)
        out, lse = batched_flash_attention(
            q, view, return_lse=True, backend=backend, query_lens=query_lens, split_size=64, **variants
        )
        assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4, (group, query_lens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window_left, softcap, alibi, sinks", COMBINATIONS[::3])
def test_forward_prefill_combinations(backend, window_left, softcap, alibi, sinks):
    rng = np.random.default_rng(11)
    for q_len, kv_len, group in [(7, 7, 1), (9, 150, 4), (1, 65, 8)]:
        q = rng.standard_normal((q_len, 2 * group, 16)).astype(np.float32)
        k, v = rng.standard_normal((2, kv_len, 2, 16)).astype(np.float32)
        variants = variant_args(rng, 2 * group, window_left, softcap, alibi, sinks)
        for causal in (False, True):
            ref, ref_lse = variant_reference(q, k, v, causal=causal, **variants)
            out, lse = flash_attention_forward(q, k, v, causal=causal, return_lse=True, backend=backend, **variants)
            assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4, (q_len, kv_len, causal)


def test_window_reads_only_the_window():
    """Keys before the window are never read: NaN there changes nothing."""
    rng = np.random.default_rng(3)
    k, v = rng.standard_normal((2, 1000, 1, 32)).astype(np.float32)
    k[:900], v[:900] = np.nan, np.nan
    q = rng.standard_normal((1, 4, 32)).astype(np.float32)
    for backend in ("simd", "cython"):
        out = flash_attention_forward(q, k, v, window_left=99, backend=backend)
        assert np.isfinite(out).all()
        assert rel_err(out, variant_reference(q, k[900:], v[900:])[0]) < 1e-5


BAD = [
    (dict(window_left=-1), "window_left"),
    (dict(window_left=1.5), "window_left"),
    (dict(window_left=True), "window_left"),
    (dict(softcap=0.0), "softcap"),
    (dict(softcap=-3.0), "softcap"),
    (dict(softcap=float("nan")), "softcap"),
    (dict(softcap="big"), "softcap"),
    (dict(alibi_slopes=np.ones(5)), "alibi_slopes"),
    (dict(alibi_slopes=np.array([1.0, np.nan, 1.0, 1.0])), "alibi_slopes"),
    (dict(sinks=np.ones((4, 1))), "sinks"),
    (dict(sinks=np.array([0, 1, 2, 3])), "sinks"),
    (dict(sinks=[0.0, 0.0, np.inf, 0.0]), "sinks"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, name", BAD)
def test_bad_variants_name_the_argument(backend, bad, name):
    q, k = np.ones((1, 4, 8), np.float32), np.ones((6, 2, 8), np.float32)
    with pytest.raises(AttentionError, match=name):
        flash_attention_forward(q, k, k, backend=backend, **bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "query_lens, needle",
    [
        ([1, 1], "one count per slot"),
        ([1, -1, 1], r"query_lens\[1\]"),
        ([1, 9, 0], r"query_lens\[1\]"),
        ([1, 1, 0], "sum to the rows"),
        ("abc", "query_lens"),
        ([1, 1.5, 1], r"query_lens\[1\]"),
    ],
)
def test_bad_query_lens(backend, query_lens, needle):
    cache = KvCache(num_slots=3, capacity=10, num_kv_heads=1, head_dim=4)
    for slot in range(3):
        cache.append(slot, np.ones((3, 1, 4)), np.ones((3, 1, 4)))
    with pytest.raises(AttentionError, match=needle):
        batched_flash_attention(
            np.ones((3, 2, 4), np.float32), cache.view(range(3)), backend=backend, query_lens=query_lens
        )


@pytest.mark.parametrize(
    "window_left, softcap, alibi, sinks", [(None, None, True, True), (8, None, False, True), (3, None, True, False)]
)
def test_matches_torch_sdpa_with_an_explicit_mask(window_left, softcap, alibi, sinks):
    """torch.nn.functional.scaled_dot_product_attention given the window and ALiBi as a float mask, and each sink
    as an extra key with a zero value whose score is the sink."""
    torch = require_module("torch")
    rng = np.random.default_rng(5)
    q_len, kv_len, num_heads, head_dim = 6, 40, 4, 16
    q = rng.standard_normal((q_len, num_heads, head_dim)).astype(np.float32)
    k, v = rng.standard_normal((2, kv_len, num_heads, head_dim)).astype(np.float32)
    variants = variant_args(rng, num_heads, window_left, softcap, alibi, sinks)
    p, j = np.arange(q_len)[:, None] + kv_len - q_len, np.arange(kv_len)[None, :]
    visible = (j <= p) & ((j >= p - window_left) if window_left is not None else True)
    bias = np.where(visible, 0.0, -np.inf)[None] - (
        variants["alibi_slopes"][:, None, None] * np.abs(p - j) if alibi else 0.0
    )  # (H, Lq, Lkv)
    qt, kt, vt = (torch.from_numpy(x).permute(1, 0, 2) for x in (q, k, v))  # (H, L, D)
    mask = torch.from_numpy(np.broadcast_to(bias, (num_heads, q_len, kv_len)).astype(np.float32))
    if sinks:  # the sink: a key whose score is exactly sink[h] and whose value is 0
        scale = head_dim**-0.5
        sink_key = torch.zeros(num_heads, 1, head_dim)
        kt, vt = torch.cat([kt, sink_key], 1), torch.cat([vt, torch.zeros(num_heads, 1, head_dim)], 1)
        sink_bias = torch.from_numpy(variants["sinks"])[:, None, None].expand(num_heads, q_len, 1)
        mask = torch.cat([mask, sink_bias], 2)
        expected = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    else:
        expected = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    expected = expected.permute(1, 0, 2).numpy()
    for backend in BACKENDS:
        out = flash_attention_forward(q, k, v, causal=True, backend=backend, **variants)
        assert rel_err(out, expected) < 1e-4, backend
