"""The serving engine of chapter 11: the numpy Llama against transformers, and the engine's promises —
each request's tokens are those it gets alone, whatever the batch, the policy or the pool; no block leaks;
running out of blocks delays requests and loses none; prefix sharing uses fewer blocks for the same answers;
one kernel call per layer and step."""

import numpy as np
import pytest
from conftest import TINY_LLAMA, rel_err, require_module

import flashdecode.serve as serve
from flashdecode.serve import (
    Engine,
    LayerCaches,
    ModelConfig,
    Request,
    blocks_needed,
    engine_timeline,
    forward,
    random_weights,
    spread_workload,
)

TINY = ModelConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
)


@pytest.fixture(scope="module")
def hf_model():
    torch, transformers = require_module("torch"), require_module("transformers")
    config = transformers.LlamaConfig(
        **TINY_LLAMA,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="module")
def weights():
    return random_weights(TINY, seed=5)


def engine_args(**overrides):
    return {**dict(num_blocks=64, block_size=8, token_budget=16, max_running=4), **overrides}


def workload():
    return spread_workload(10, TINY.vocab_size, seed=2, prompt_median=14, output_median=8, longest=48)


def alone(weights, requests, **overrides):
    return {r.request_id: Engine(weights, **engine_args(**overrides)).run([r])[r.request_id] for r in requests}


def test_numpy_llama_matches_transformers_logits_for_a_batch_of_prompts(hf_model):
    torch = require_module("torch")
    weights = serve.weights_from_transformers(hf_model)
    assert weights.config == TINY
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, n) for n in (1, 9, 33, 4)]
    more = [rng.integers(0, 128, n) for n in (2, 1, 5, 1)]
    caches = LayerCaches(2, num_blocks=32, block_size=8, num_kv_heads=2, head_dim=16)
    seqs = [caches.new_sequence() for _ in prompts]
    first = forward(weights, caches, seqs, prompts, all_logits=True)  # the prompts as one ragged batch
    second = forward(weights, caches, seqs, more, all_logits=True)  # chunks on top of the cached prompts
    first = np.split(first, np.cumsum([len(p) for p in prompts])[:-1])
    second = np.split(second, np.cumsum([len(m) for m in more])[:-1])
    for prompt, chunk, ours_prompt, ours_chunk in zip(prompts, more, first, second):
        with torch.no_grad():
            theirs = hf_model(torch.tensor(np.concatenate([prompt, chunk])[None])).logits[0].numpy()
        assert rel_err(ours_prompt, theirs[: len(prompt)]) < 1e-4
        assert rel_err(ours_chunk, theirs[len(prompt) :]) < 1e-4


def test_engine_greedy_tokens_match_transformers_generate(hf_model):
    torch = require_module("torch")
    weights = serve.weights_from_transformers(hf_model)
    rng = np.random.default_rng(1)
    requests = [Request(i, rng.integers(0, 128, n).tolist(), m) for i, (n, m) in enumerate([(3, 10), (20, 6), (1, 12)])]
    outputs = Engine(weights, **engine_args()).run(requests)
    for request in requests:
        with torch.no_grad():
            theirs = hf_model.generate(
                torch.tensor([request.prompt]),
                max_new_tokens=request.max_new_tokens,
                do_sample=False,
                attention_mask=torch.ones(1, len(request.prompt), dtype=torch.long),
            )
        assert outputs[request.request_id] == [theirs[0, len(request.prompt) :].tolist()]


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_every_request_gets_the_tokens_it_gets_alone(weights, policy):
    requests = workload()
    engine = Engine(weights, **engine_args(policy=policy))
    assert engine.run(requests) == alone(weights, requests)
    assert any(len(record.rows) > 1 for record in engine.history)  # the requests really shared steps


def test_no_block_leaks_and_the_reservation_bounds_the_pool(weights):
    engine = Engine(weights, **engine_args(num_blocks=24))
    engine.run(workload() + [Request(99, list(range(11)), 5, samples=3)])
    assert engine.caches.num_free_blocks == 24 and engine.reserved == 0 and not engine.running
    for cache in engine.caches.layers:
        assert cache.num_free_blocks == 24 and not cache.block_tables and not cache.ref_counts.any()
    assert all(r.blocks_in_use <= r.blocks_reserved <= 24 for r in engine.history)


def test_running_out_of_blocks_delays_requests_and_loses_none(weights):
    requests = workload()
    roomy = Engine(weights, **engine_args())
    tight = Engine(weights, **engine_args(num_blocks=10))
    assert tight.run(requests) == roomy.run(requests)
    assert sorted(tight.finish) == [r.request_id for r in requests]
    assert any(tight.admitted[r.request_id] > roomy.admitted[r.request_id] for r in requests)
    assert max(r.blocks_in_use for r in tight.history) <= 10 and tight.caches.num_free_blocks == 10


def test_a_request_too_big_for_the_pool_is_refused_at_once(weights):
    engine = Engine(weights, **engine_args(num_blocks=4))
    with pytest.raises(ValueError, match="could never be admitted"):
        engine.submit(Request(0, list(range(30)), 10))
    assert not engine.waiting


def test_prefix_sharing_uses_fewer_blocks_for_the_same_answers(weights):
    requests = [
        Request(i, list(range(7 * i, 7 * i + n)), 5, samples=s) for i, (n, s) in enumerate([(21, 4), (16, 3), (3, 2)])
    ]
    peaks, outputs = {}, {}
    for share in (True, False):
        engine = Engine(weights, **engine_args(token_budget=32, max_running=8, share_prefix=share))
        outputs[share] = engine.run(requests)
        peaks[share] = max(r.blocks_in_use for r in engine.history)
        assert engine.caches.num_free_blocks == 64
    assert outputs[True] == outputs[False] == alone(weights, requests, token_budget=32, max_running=8)
    assert peaks[True] < peaks[False]
    for answers in outputs[True].values():
        assert len({answer[0] for answer in answers}) == len(answers)  # sample i starts with the i-th best
    assert blocks_needed(21, 5, 4, 8) == 2 + 4 * (4 - 2)


def test_one_kernel_call_per_layer_and_step(weights, monkeypatch):
    calls = []
    kernel = serve.batched_flash_attention
    monkeypatch.setattr(
        serve, "batched_flash_attention", lambda *a, **k: calls.append(k["query_lens"]) or kernel(*a, **k)
    )
    engine = Engine(weights, **engine_args())
    engine.run(workload())
    assert len(calls) == engine.steps * TINY.num_layers
    assert [sum(lens) for lens in calls[:: TINY.num_layers]] == [sum(n for *_, n in r.rows) for r in engine.history]


def test_the_timeline_matches_the_history(weights):
    engine = Engine(weights, **engine_args(num_blocks=12))
    requests = workload()
    engine.run(requests)
    grid = engine_timeline(engine)
    assert grid.shape == (len(requests), engine.steps)
    for record in engine.history:
        running = {rid for rid, *_ in record.rows}
        assert set(np.flatnonzero(grid[:, record.step] >= serve.PREFILL)) == running
        assert (grid[:, record.step] == serve.WAITING).sum() == record.waiting


def test_the_command_line_demo_runs(capsys):
    rows = serve.main(["--requests", "5", "--quiet"])
    printed = capsys.readouterr().out
    assert "continuous batching" in printed and "every policy gave every request the same tokens" in printed
    assert [row["policy"] for row in rows] == list(serve.POLICIES)


def test_a_request_id_is_refused_while_waiting_running_or_done(weights):
    engine = Engine(weights, **engine_args())
    first, second = workload()[:2]
    engine.submit(first)
    with pytest.raises(ValueError, match="already in the engine"):  # waiting
        engine.submit(first)
    serve.run_step(engine)
    assert engine.running
    with pytest.raises(ValueError, match="already in the engine"):  # running
        engine.submit(first)
    engine.run([second])
    with pytest.raises(ValueError, match="already in the engine"):  # done
        engine.submit(first)
