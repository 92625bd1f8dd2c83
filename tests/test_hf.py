"""flashdecode as the attention of transformers models (flashdecode.hf, book/10_transformers.ipynb).

Tiny models built from configs with random weights (nothing is downloaded): a left-padded batch of prompts of
different lengths, greedy generate() of 30 tokens must give exactly eager's tokens, and the prefill logits of the
real tokens must agree to 1e-4 relative. Mistral (a sliding window shorter than the text), Gemma 2 (soft-cap,
sliding window) and gpt-oss (sinks) need the kernel's window_left / softcap / sinks: they are expected to fail
(strictly) with a kernel that lacks those keyword arguments and must pass with one that has them. The same three
also run through a float64 reference kernel that has the arguments, which checks the adapter's side alone.
"""

import re
import subprocess
import sys
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import TINY_LLAMA
from transformers import DynamicCache  # noqa: E402
from transformers.masking_utils import sdpa_mask  # noqa: E402

import flashdecode.hf as hf  # flashdecode itself came first, with conftest: OMP_WAIT_POLICY=PASSIVE for both runtimes
from flashdecode.api import kernel_ready  # noqa: E402
from flashdecode.variants import batched_variant_reference, variant_reference  # noqa: E402

transformers.logging.set_verbosity_error()
NAME = hf.register()


def needs_variants(*names):
    """Marks for a test that needs the kernel's keyword arguments `names`: an expected failure (strict, so it must
    pass once they exist) while the installed kernel lacks any of them."""
    missing = [name for name in names if not hf.kernel_accepts(name)]
    return [
        pytest.mark.needs_variants,
        pytest.mark.xfail(
            condition=bool(missing),
            strict=True,
            raises=NotImplementedError,
            reason=f"the kernel does not accept {', '.join(missing) or 'them'} yet (issue 11)",
        ),
    ]


COMMON = dict(
    **TINY_LLAMA,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_model(arch):
    """A 2-layer model of the named architecture with random weights, in eval mode."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GptOssConfig,
        GptOssForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    configs = {
        "llama": (LlamaForCausalLM, LlamaConfig(**COMMON)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON)),
        "mistral": (MistralForCausalLM, MistralConfig(sliding_window=8, **COMMON)),
        "gemma2": (
            Gemma2ForCausalLM,
            Gemma2Config(sliding_window=8, head_dim=16, attn_logit_softcapping=1.0, initializer_range=0.2, **COMMON),
        ),  # a cap that binds
        "gpt_oss": (
            GptOssForCausalLM,
            GptOssConfig(sliding_window=8, head_dim=16, num_local_experts=4, num_experts_per_tok=2, **COMMON),
        ),
    }
    cls, config = configs[arch]
    torch.manual_seed(0)
    model = cls(config).eval()
    if arch == "gpt_oss":  # sinks start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


def padded_prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, COMMON["vocab_size"], (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths)) >= max(lengths) - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def run(model, implementation, ids, mask, new_tokens=30, **generate):
    """(prefill logits, generated tokens) with the given attention implementation."""
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **generate
        )
    return logits, out[:, ids.shape[1] :]


def check_against_eager(arch, **generate):
    model = tiny_model(arch)
    ids, mask = padded_prompts([12, 9, 6])
    eager_logits, eager_tokens = run(model, "eager", ids, mask, **generate)
    logits, tokens = run(model, NAME, ids, mask, **generate)
    real = mask.bool()
    err = ((logits - eager_logits)[real].abs().max() / eager_logits[real].abs().max()).item()
    assert err < 1e-4, f"{arch}: prefill logits differ from eager by {err:.2e} relative"
    assert torch.equal(tokens, eager_tokens), f"{arch}: generated tokens differ from eager's"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_matches_eager(arch):
    check_against_eager(arch)


def test_static_cache():
    """A static cache is allocated for the longest sequence: the mask hides its unused tail, the plan stops
    before it."""
    check_against_eager("llama", cache_implementation="static")


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param("mistral", marks=needs_variants("window_left")),
        pytest.param("gemma2", marks=needs_variants("window_left", "softcap")),
        pytest.param("gpt_oss", marks=needs_variants("window_left", "sinks")),
    ],
)
def test_generate_matches_eager_with_variants(arch):
    check_against_eager(arch)


# --- the adapter's side of the variants, through a float64 reference kernel that has the keyword arguments ---


def reference_forward(q, k, v, softmax_scale=None, causal=False, *, window_left=None, softcap=None, sinks=None):
    """Chapter 09's float64 reference behind the kernel's signature (its keyword arguments, which the adapter
    inspects)."""
    variants = dict(window_left=window_left, softcap=softcap, sinks=sinks)
    return variant_reference(q, k, v, softmax_scale, causal, **variants)[0].astype(np.float32)


def reference_batched(q_batch, kv_view, softmax_scale=None, *, window_left=None, softcap=None, sinks=None):
    variants = dict(window_left=window_left, softcap=softcap, sinks=sinks)
    return batched_variant_reference(q_batch, kv_view, softmax_scale, **variants)[0].astype(np.float32)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gpt_oss", "llama"])
def test_variant_mapping_through_a_reference_kernel(arch, monkeypatch):
    monkeypatch.setattr(hf, "flash_attention_forward", reference_forward)
    monkeypatch.setattr(hf, "batched_flash_attention", reference_batched)
    check_against_eager(arch)


def test_missing_variant_is_refused_by_name(monkeypatch):
    """A kernel without window_left: a Mistral whose window binds gets NotImplementedError naming it."""
    monkeypatch.setattr(hf, "flash_attention_forward", lambda q, k, v, softmax_scale=None, causal=False: 1 / 0)
    monkeypatch.setattr(hf, "batched_flash_attention", lambda q_batch, kv_view, softmax_scale=None: 1 / 0)
    with pytest.raises(NotImplementedError, match="window_left=7"):
        check_against_eager("mistral")
    with pytest.raises(NotImplementedError, match="softcap=1.0"):
        check_against_eager("gemma2")
    with pytest.raises(NotImplementedError, match="sinks=per head"):
        check_against_eager("gpt_oss")


# --- zero-copy ---


def decode_step_with_cache(model, length, spy=None, monkeypatch=None, dtype=torch.float32):
    """numpy's peak allocation (bytes) during one decode step over `length` cached tokens, and the cache's bytes."""
    cache = DynamicCache(config=model.config)
    for layer in range(model.config.num_hidden_layers):
        cache.update(torch.randn(2, 2, length, 16).to(dtype), torch.randn(2, 2, length, 16).to(dtype), layer)
    step = dict(
        input_ids=torch.tensor([[5], [6]]),
        attention_mask=torch.ones(2, length + 1, dtype=torch.long),
        cache=cache,
        use_cache=True,
    )
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        model(**step)
        cache.crop(-1)
        if spy is not None:
            monkeypatch.setattr(hf, "batched_flash_attention", spy)
        tracemalloc.start()
        model(**step)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_reads_the_cache_in_place(monkeypatch, dtype):
    seen = []
    real = hf.batched_flash_attention

    def spy(q_batch, kv_view, *args, **kwargs):
        for b in range(kv_view.slot_count()):
            k, v = kv_view.kv_for_slot(b)
            seen.append((k, v, kernel_ready(k) is k and kernel_ready(v) is v))
        return real(q_batch, kv_view, *args, **kwargs)

    model = tiny_model("llama").to(dtype)
    short_peak, _, _ = decode_step_with_cache(model, 4096, dtype=dtype)
    peak, cache_bytes, cache = decode_step_with_cache(model, 65_536, spy, monkeypatch, dtype)
    assert peak < cache_bytes / 100 and peak < 2 * short_peak + 16384, (peak, short_peak, cache_bytes)
    storages = [
        (t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes())
        for layer in cache.layers
        for t in (layer.keys, layer.values)
    ]
    assert len(seen) == 2 * model.config.num_hidden_layers
    for k, v, in_place in seen:
        assert in_place and k.shape == (65_537, 2, 16)  # the cache and the new token
        for array in (k, v):
            address = array.__array_interface__["data"][0]
            assert any(lo <= address < hi for lo, hi in storages), "the kernel read a copy of the cache"


# --- masks: what is expressed, what is refused ---


def random_plan_mask(rng, q_len, kv_len):
    """A mask (Lq, Lkv) of left padding + causal/full + sometimes a window, and its plan."""
    start = int(rng.integers(0, kv_len))
    causal = q_len == 1 or bool(rng.integers(0, 2))
    end = kv_len if causal or rng.integers(0, 2) else int(rng.integers(start + 1, kv_len + 1))
    if causal:
        end = max(end, q_len)
    window = int(rng.integers(0, kv_len)) if causal and rng.integers(0, 2) else None
    plan = (start, end, causal, window)
    return plan, hf.expected_mask(plan, q_len, kv_len)


def test_every_expressible_mask_gives_its_plan_and_no_other_mask_is_accepted():
    rng = np.random.default_rng(0)
    for case in range(400):
        q_len, kv_len = int(rng.integers(1, 7)), int(rng.integers(6, 13))
        plans, masks = zip(*[random_plan_mask(rng, q_len, kv_len) for _ in range(3)])
        mask = torch.from_numpy(np.stack(masks))[:, None]
        got = hf.batch_plans(mask.clone(), q_len, kv_len, batch=3)
        for plan, rows, found in zip(plans, masks, got):
            assert np.array_equal(hf.expected_mask(found, q_len, kv_len), rows), (plan, found)
        flipped = mask.clone()
        flipped[0, 0, int(rng.integers(0, q_len)), int(rng.integers(0, kv_len))] ^= True
        try:
            found = hf.batch_plans(flipped, q_len, kv_len, batch=3)[0]
        except hf.MaskError:
            continue
        assert np.array_equal(hf.expected_mask(found, q_len, kv_len), flipped[0, 0].numpy()), case


def test_refused_masks():
    hole = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    hole[..., 3] = False
    with pytest.raises(hf.MaskError, match="cannot express"):
        hf.batch_plans(hole, 1, 6, 1)
    bias = torch.zeros(1, 1, 1, 6)
    bias[..., 2] = -1.0  # an additive bias, not a mask
    with pytest.raises(hf.MaskError, match="bias"):
        hf.batch_plans(bias, 1, 6, 1)
    per_head = torch.ones(1, 2, 1, 6, dtype=torch.bool)
    per_head[0, 1, 0, 0] = False
    with pytest.raises(hf.MaskError, match="heads"):
        hf.batch_plans(per_head, 1, 6, 1)
    with pytest.raises(hf.MaskError, match="shape"):
        hf.batch_plans(torch.ones(1, 1, 2, 6, dtype=torch.bool), 1, 6, 1)
    layer = types.SimpleNamespace(training=False, is_causal=True)
    for q_len in (1, 3):  # a mask narrower than the keys: refused
        mask = torch.ones(1, 1, q_len, 6, dtype=torch.bool)
        with pytest.raises(hf.MaskError, match="shape"):
            hf.fdecode_attention(
                layer,
                torch.randn(1, 4, q_len, 16),
                torch.randn(1, 2, 7, 16),
                torch.randn(1, 2, 7, 16),
                mask,
                scaling=0.25,
            )


def test_rows_with_different_windows_in_prefill(monkeypatch):
    """Each prefill row gets its own window_left (here through the reference kernel); decode needs none."""
    monkeypatch.setattr(hf, "flash_attention_forward", reference_forward)
    monkeypatch.setattr(hf, "batched_flash_attention", reference_batched)
    layer = types.SimpleNamespace(training=False, is_causal=True)
    for q_len in (6, 1):
        rows = [hf.expected_mask((start, 6, True, w), q_len, 6) for start, w in [(0, 2), (1, 3), (0, None)]]
        mask = torch.from_numpy(np.stack(rows))[:, None]
        q, k, v = torch.randn(3, 4, q_len, 16), torch.randn(3, 2, 6, 16), torch.randn(3, 2, 6, 16)
        out, _ = hf.fdecode_attention(layer, q, k, v, mask, scaling=0.25)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=0.25, enable_gqa=True)
        assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5), q_len


def test_float_mask_and_padding_queries():
    """An additive float mask (eager's) gives the boolean mask's result; queries that see no key give zeros."""
    padding = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    boolean = sdpa_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=padding, allow_is_causal_skip=False)
    additive = torch.where(boolean, 0.0, torch.finfo(torch.float32).min)
    layer = types.SimpleNamespace(training=False, is_causal=True)
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    out_bool, _ = hf.fdecode_attention(layer, q, k, v, boolean, scaling=0.25)
    out_float, _ = hf.fdecode_attention(layer, q, k, v, additive, scaling=0.25)
    assert torch.equal(out_bool, out_float) and out_bool.shape == (2, 6, 4, 16)
    assert torch.equal(out_bool[0, :3], torch.zeros(3, 4, 16))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, boolean, scale=0.25, enable_gqa=True)
    assert torch.allclose(out_bool[0, 3:], expected.transpose(1, 2)[0, 3:], atol=1e-5)
    assert torch.allclose(out_bool[1], expected.transpose(1, 2)[1], atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 3e-2)])
def test_model_dtypes(dtype, atol):
    layer = types.SimpleNamespace(training=False, is_causal=True)
    generator = torch.Generator().manual_seed(1)
    for q_len in (1, 5):
        q = torch.randn(2, 4, q_len, 16, generator=generator)
        k, v = torch.randn(2, 2, 9, 16, generator=generator), torch.randn(2, 2, 9, 16, generator=generator)
        out, weights = hf.fdecode_attention(layer, q.to(dtype), k.to(dtype), v.to(dtype), None, scaling=0.25)
        causal = torch.ones(q_len, 9, dtype=torch.bool).tril(9 - q_len)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), causal, scale=0.25, enable_gqa=True
        ).transpose(1, 2)
        assert out.dtype == dtype and weights is None and out.shape == (2, q_len, 4, 16)
        assert torch.allclose(out.float(), expected, atol=atol), (dtype, q_len)


def test_bfloat16_model_generates():
    model = tiny_model("llama").to(torch.bfloat16)
    ids, mask = padded_prompts([7, 4])
    logits, tokens = run(model, NAME, ids, mask, new_tokens=5)
    eager_logits, _ = run(model, "eager", ids, mask, new_tokens=1)
    assert logits.dtype == torch.bfloat16 and tokens.shape == (2, 5)
    real = mask.bool()
    assert (logits - eager_logits)[real].abs().max() <= 0.05 * eager_logits[real].abs().max()


def test_register_is_idempotent_and_avoids_the_flash_loader():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert hf.register() == hf.register() == NAME and "flash" not in NAME
    assert AttentionInterface._global_mapping[NAME] is hf.fdecode_attention
    assert AttentionMaskInterface._global_mapping[NAME] is hf.fdecode_mask


def test_training_dropout_is_refused():
    layer = types.SimpleNamespace(training=True, is_causal=True)
    q, kv = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="dropout"):
        hf.fdecode_attention(layer, q, kv, kv, None, scaling=0.25, dropout=0.1)


def test_the_readme_lines_switch_a_model():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "flashdecode.hf" in block]
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    model = namespace["model"]
    assert namespace["name"] == NAME and model.config._attn_implementation == NAME
    ids, mask = padded_prompts([5, 3])
    with torch.no_grad():
        assert (
            model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == 8
        )


@pytest.mark.parametrize(
    "imports, torch_first",
    [("import torch, flashdecode.hf", True), ("import flashdecode, torch, flashdecode.hf", False)],
)
def test_torch_first_is_the_import_order(imports, torch_first):
    result = subprocess.run(
        [sys.executable, "-c", f"{imports}; print(flashdecode.hf.TORCH_FIRST)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == str(torch_first), result.stderr[-2000:]


def test_register_warns_when_torch_started_first(monkeypatch):
    monkeypatch.setattr(hf, "TORCH_FIRST", True)
    with pytest.warns(RuntimeWarning, match="torch was imported before flashdecode"):
        assert hf.register() == NAME
