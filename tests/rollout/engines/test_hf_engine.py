"""HF reference engine and the weight-streaming helpers (no vLLM needed)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import perturbed, tiny_vllm_engine
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rollout.engines.hf import HFEngine, top_p_mask
from rollout.engines.protocol import RolloutEngine, Sample, SamplingConfig, rollout_metrics, sample_seed
from rollout.weights import (
    WeightStream,
    convert_bucketed,
    iter_state_dict,
    next_version,
    write_safetensors_shards,
)


@pytest.fixture(scope="module")
def engine(tiny_qwen2_path: str) -> HFEngine:
    return HFEngine(tiny_qwen2_path)


def eos_heavy(path: str, token: int) -> torch.nn.Module:
    """Tiny model whose EOS (id 0) embedding is 3 × `token`'s: where greedy would pick `token`, it stops.

    The random tiny model mostly repeats its last input token (the residual stream carries the input
    embedding and the head is tied), so after a prompt ending in `token` EOS dominates.
    """
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[0] = 3 * emb[token]
    return model


def test_protocol_and_sample_structure(engine: HFEngine) -> None:
    assert isinstance(engine, RolloutEngine)
    samples = engine.generate(["What is 2 + 3?", [5, 6, 7]], SamplingConfig(max_tokens=6, n=2, seed=0))
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    assert samples[2].prompt_ids == [5, 6, 7]
    assert samples[0].prompt_ids == engine.tokenizer("What is 2 + 3?")["input_ids"]
    for s in samples:
        assert isinstance(s, Sample)
        assert len(s.response_ids) == len(s.logprobs) == 6
        assert s.finish_reason == "length"
        assert all(lp <= 0 and math.isfinite(lp) for lp in s.logprobs)
        assert s.policy_version == engine.policy_version
    assert engine.metrics["rollout/output_tokens"] == 24
    assert engine.metrics["rollout/finish_length"] == 4


def test_group_samples_differ_and_seed_reproduces(engine: HFEngine) -> None:
    """Identical prompts, one seed: every sample still gets its own stream (`sample_seed`)."""
    params = SamplingConfig(max_tokens=8, n=3, seed=7)
    first = [s.response_ids for s in engine.generate([[5, 6, 7], [5, 6, 7]], params)]
    assert len({tuple(r) for r in first}) == 6
    assert [s.response_ids for s in engine.generate([[5, 6, 7], [5, 6, 7]], params)] == first
    shard = engine.generate([[5, 6, 7]], replace(params, first_index=1))  # the batch's second prompt, alone
    assert [s.response_ids for s in shard] == first[3:]
    other = [
        s.response_ids
        for s in engine.generate([[5, 6, 7], [5, 6, 7]], SamplingConfig(max_tokens=8, n=3, seed=8))
    ]
    assert other != first
    seeds = {sample_seed(base, i, 3, k) for base in (7, 8) for i in range(50) for k in range(3)}
    assert len(seeds) == 300 and max(s for s in seeds if s is not None) < 2**63  # distinct, int64
    assert sample_seed(7, 1, 3, 2) == sample_seed(7, 1, 3, 0) + 2  # vLLM's child seeds: request seed + k


def test_greedy_batch_equals_single(engine: HFEngine) -> None:
    """Left padding in a batch does not change greedy tokens or log-probs."""
    params = SamplingConfig(max_tokens=10, temperature=0.0, min_tokens=0)
    prompts = [[5, 6, 7], list(range(30, 50))]
    batch = engine.generate(prompts, params)
    for p, b in zip(prompts, batch, strict=True):
        (single,) = engine.generate([p], params)
        assert single.response_ids == b.response_ids
        assert max(abs(x - y) for x, y in zip(single.logprobs, b.logprobs, strict=True)) < 1e-5


def test_min_tokens_and_eos(tiny_qwen2_path: str) -> None:
    """EOS ends a sample (kept in the ids, not in the text) but is masked for the first min_tokens."""
    engine = HFEngine(eos_heavy(tiny_qwen2_path, 7), tiny_qwen2_path)
    (now,) = engine.generate([[5, 6, 7]], SamplingConfig(max_tokens=10, temperature=0.0, min_tokens=0))
    assert now.response_ids == [0] and now.finish_reason == "stop" and now.text == ""
    (later,) = engine.generate([[5, 6, 7]], SamplingConfig(max_tokens=10, temperature=0.0, min_tokens=4))
    assert 0 not in later.response_ids[:4]
    assert later.response_ids[-1] == 0 and later.finish_reason == "stop" and len(later.response_ids) == 5


def test_stop_string_kept_and_respects_min_tokens(engine: HFEngine) -> None:
    base = SamplingConfig(max_tokens=30, temperature=1.0, seed=3, stop=())
    (full,) = engine.generate([[5, 6, 7]], base)
    stop = engine.tokenizer.decode(full.response_ids[8:10])
    params = SamplingConfig(max_tokens=30, temperature=1.0, seed=3, stop=(stop,), min_tokens=4)
    (cut,) = engine.generate([[5, 6, 7]], params)
    assert cut.finish_reason == "stop"
    assert cut.text.endswith(stop)
    boundary = len(engine.tokenizer.decode(full.response_ids[:4]))  # a match must end after this
    start = full.text.find(stop, max(0, boundary - len(stop) + 1))
    assert cut.text == full.text[: start + len(stop)]
    assert cut.response_ids == full.response_ids[: len(cut.response_ids)]
    assert len(cut.response_ids) <= 10


def test_stop_string_may_start_inside_min_tokens(tiny_qwen2_path: str) -> None:
    """vLLM's rule: a stop string counts when it *ends* after the first min_tokens tokens' text, even if it
    starts inside it; one ending exactly at that boundary does not count; the earliest-ending match wins."""
    engine = HFEngine(perturbed(tiny_qwen2_path), tiny_qwen2_path)
    base = SamplingConfig(max_tokens=12, temperature=1.0, seed=4, min_tokens=4, stop=())
    (full,) = engine.generate([[5, 6, 7]], base)
    ids, decode = full.response_ids, engine.tokenizer.decode
    assert full.finish_reason == "length" and decode(ids[:6]).isascii()  # 1 char per byte: offsets are plain

    def cut(*stop: str) -> Sample:
        (sample,) = engine.generate([[5, 6, 7]], replace(base, stop=stop))
        assert sample.response_ids == ids[: len(sample.response_ids)]  # same stream up to the cut
        return sample

    spanning = decode(ids[2:6])  # tokens 3-6, across the boundary after token 4
    assert full.text.count(spanning) == 1
    sample = cut(spanning)
    assert (sample.finish_reason, len(sample.response_ids), sample.text) == ("stop", 6, decode(ids[:6]))
    at_boundary = decode(ids[1:4])  # ends exactly where the first min_tokens tokens end
    assert full.text.count(at_boundary) == 1
    sample = cut(at_boundary)
    assert sample.finish_reason == "length" and sample.response_ids == ids
    sample = cut(spanning, decode(ids[3:5]))  # the second ends first (token 5)
    assert (sample.finish_reason, len(sample.response_ids), sample.text) == ("stop", 5, decode(ids[:5]))


@pytest.mark.vllm
@pytest.mark.slow  # starts its own vLLM engine (about a minute on a shared CPU)
def test_stop_string_across_min_tokens_boundary_matches_vllm(tiny_qwen2_path: str) -> None:
    """Greedy, min_tokens=4, stop = the text of tokens 3-6: vLLM and HF cut at the same token (the tiny model
    repeats one token, so the stop string first completes at token 5, starting at token 2)."""
    hf = HFEngine(tiny_qwen2_path)
    vllm = tiny_vllm_engine(tiny_qwen2_path)
    try:
        greedy = SamplingConfig(max_tokens=12, temperature=0.0, min_tokens=4, stop=())
        for prompt in ([5, 6, 7], "What is 2 + 3?"):
            (full,) = hf.generate([prompt], greedy)
            params = replace(greedy, stop=(hf.tokenizer.decode(full.response_ids[2:6]),))
            (ours,), (ref,) = vllm.generate([prompt], params), hf.generate([prompt], params)
            assert (ours.response_ids, ours.text, ours.finish_reason) == (
                ref.response_ids, ref.text, ref.finish_reason,
            )  # fmt: skip
            assert ref.finish_reason == "stop" and len(ref.response_ids) == 5
    finally:
        vllm.close()


def test_context_limit_ends_samples_and_refuses_full_prompts(tiny_gpt2_path: str) -> None:
    """The model's positions (GPT-2: n_positions 2048) are `max_model_len`: a 2040-token prompt gets 8 tokens and
    "length" (it ran past the position table: IndexError), also beside a short prompt that goes on; prompts
    vLLM refuses (no room for a token, empty, an id outside the vocabulary) are ValueErrors naming the prompt."""
    engine = HFEngine(tiny_gpt2_path)
    assert engine.max_model_len == 2048
    greedy = SamplingConfig(max_tokens=16, temperature=0.0, min_tokens=0, stop=())
    long, short = engine.generate([[5] * 2040, [5, 6, 7]], greedy)
    assert (len(long.response_ids), len(long.logprobs), long.finish_reason) == (8, 8, "length")
    assert long.text == engine.tokenizer.decode(long.response_ids, skip_special_tokens=True)
    (alone,) = engine.generate([[5, 6, 7]], greedy)
    assert short.response_ids == alone.response_ids and len(short.response_ids) == 16
    sampled = engine.generate([[5] * 2047], SamplingConfig(max_tokens=4, min_tokens=4, stop=(), n=2, seed=0))
    assert [(len(s.response_ids), s.finish_reason) for s in sampled] == [(1, "length")] * 2
    with pytest.raises(ValueError, match="prompt 1 has 2048 tokens, which leaves no room for a response"):
        engine.generate([[5], [5] * 2048], greedy)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], greedy)
    with pytest.raises(ValueError, match=r"prompt 0 has token id 1024, outside the vocabulary \[0, 1024\)"):
        engine.generate([[5, 1024]], greedy)


@pytest.mark.vllm
def test_context_limit_matches_vllm(tiny_qwen2_path: str) -> None:
    """Qwen2 (RoPE: no crash past its 2048 positions, it went on generating): prompt + response stop at
    max_model_len with "length", the same tokens as vLLM with max_model_len 2048."""
    from rollout.engines.vllm import VLLMEngine

    hf = HFEngine(tiny_qwen2_path)
    vllm = VLLMEngine(tiny_qwen2_path, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
                      max_model_len=2048)  # fmt: skip
    try:
        assert hf.max_model_len == vllm.max_model_len == 2048
        prompts = [[40 + (11 * i) % 900 for i in range(2044)], [5, 6, 7]]
        greedy = SamplingConfig(max_tokens=10, temperature=0.0, min_tokens=0, stop=())
        for ours, ref in zip(vllm.generate(prompts, greedy), hf.generate(prompts, greedy), strict=True):
            assert (ours.response_ids, ours.text, ours.finish_reason) == (
                ref.response_ids, ref.text, ref.finish_reason,
            )  # fmt: skip
        assert [len(s.response_ids) for s in hf.generate(prompts, greedy)] == [4, 10]
    finally:
        vllm.close()


def test_one_prompt_for_the_list_of_prompts_is_refused(engine: HFEngine) -> None:
    """A bare str was generated for character by character (one sample per character); a flat id list failed
    as "'int' object is not iterable". Both are TypeErrors that show the list of prompts wanted."""
    params = SamplingConfig(max_tokens=2, min_tokens=0, stop=(), seed=0)
    with pytest.raises(TypeError, match=r"e\.g\. \['What is'\], got a bare str"):
        engine.generate("What is", params)
    with pytest.raises(TypeError, match=r"e\.g\. \[\[5, 6, 7\]\], got a flat list of token ids"):
        engine.generate([5, 6, 7], params)


def test_sampling_config_rejects_a_bare_str_and_empty_stop_strings() -> None:
    with pytest.raises(TypeError, match=r"stop must be a sequence of strings, e\.g\. \('</answer>',\)"):
        SamplingConfig(stop="</answer>")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of strings"):
        SamplingConfig(stop=("</answer>", 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty string"):
        SamplingConfig(stop=("</answer>", ""))
    assert SamplingConfig(stop=["</answer>"]).stop == ("</answer>",)  # type: ignore[arg-type]
    assert SamplingConfig(stop=()).stop == ()


def test_logprobs_are_the_sampling_distribution(engine: HFEngine) -> None:
    """Reported log-probs equal a teacher-forced rescoring with temperature and top-p applied."""
    params = SamplingConfig(max_tokens=12, temperature=0.7, top_p=0.9, seed=1)
    for s in engine.generate([[5, 6, 7], "What is"], params):
        rescored = engine.score(s.prompt_ids, s.response_ids, params)
        assert max(abs(a - b) for a, b in zip(rescored, s.logprobs, strict=True)) < 1e-5
    raw_engine = HFEngine(engine.model, engine.tokenizer, logprobs_mode="raw")
    (s,) = raw_engine.generate([[5, 6, 7]], params)
    model_lp = raw_engine.prompt_logprobs([s.prompt_ids + s.response_ids])[0][len(s.prompt_ids) - 1 :]
    assert max(abs(a - b) for a, b in zip(model_lp, s.logprobs, strict=True)) < 1e-5
    processed = engine.score(s.prompt_ids, s.response_ids, params)
    assert (
        max(abs(a - b) for a, b in zip(processed, s.logprobs, strict=True)) > 1e-2
    )  # T=0.7 does change them


def test_top_p_mask_hand_example() -> None:
    """probs (0.5, 0.3, 0.2), top_p 0.6: ascending cumsum (0.2, 0.5, 1.0); drop cumsum <= 0.4 → token 2."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert top_p_mask(logits, 0.6).isinf().tolist() == [[False, False, True]]
    assert top_p_mask(logits, 1.0).isinf().sum() == 0
    assert top_p_mask(logits, 0.1).isinf().tolist() == [[False, True, True]]  # keeps the top token


def test_update_weights_in_place(engine: HFEngine, tiny_qwen2_path: str) -> None:
    learner = perturbed(tiny_qwen2_path)
    reference = HFEngine(learner, tiny_qwen2_path)
    fresh = HFEngine(tiny_qwen2_path)
    version = fresh.policy_version
    fresh.update_weights(iter_state_dict(learner))
    assert fresh.policy_version == version + 1
    params = SamplingConfig(max_tokens=10, temperature=0.0)
    assert (
        fresh.generate([[5, 6, 7]], params)[0].response_ids
        == reference.generate([[5, 6, 7]], params)[0].response_ids
    )
    assert fresh.generate([[5, 6, 7]], params)[0].policy_version == version + 1
    assert fresh.metrics["rollout/sync_gb"] > 0
    with pytest.raises(KeyError, match=r"no\.such\.weight \(shape \(1,\)\) is not a weight of this model"):
        fresh.update_weights([("no.such.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"no tensor sent for \d+ of the model's \d+ names: "):
        fresh.update_weights(list(iter_state_dict(learner))[:3])


def test_a_stream_with_a_version_sets_it(tiny_qwen2_path: str) -> None:
    """A `WeightStream` that carries a version (a resumed run's) gives the engine that policy version; a
    stream without one, or a plain iterable, advances it by one (`next_version`)."""
    learner, fresh = perturbed(tiny_qwen2_path), HFEngine(tiny_qwen2_path)
    fresh.update_weights(WeightStream(learner, version=7))
    (sample,) = fresh.generate([[5, 6]], SamplingConfig(max_tokens=2, min_tokens=0))
    assert fresh.policy_version == 7 and sample.policy_version == 7
    fresh.update_weights(WeightStream(learner))
    fresh.update_weights(iter_state_dict(learner))
    assert fresh.policy_version == 9
    assert (next_version(WeightStream(learner, version=3), 5), next_version([], 5)) == (3, 6)
    with pytest.raises(ValueError, match="version=-1"):
        WeightStream(learner, version=-1)


def test_update_weights_checks_each_tensor_before_copying(tiny_qwen2_path: str) -> None:
    """A bad name or shape is caught before that tensor is copied, nothing after it is copied, and the error
    names every culprit; a broadcastable shape is an error, not a broadcast copy."""
    engine = HFEngine(tiny_qwen2_path)
    before = {n: t.clone() for n, t in iter_state_dict(engine.model)}
    new = [(n, t + 1) for n, t in before.items()]
    norm = next(i for i, (n, t) in enumerate(new) if t.dim() == 1)  # a (hidden,) norm weight
    name, tensor = new[norm]
    broadcastable = [*new[:norm], (name, tensor[:1]), *new[norm + 1 :]]  # (1,): copy_ would broadcast it
    culprit = rf"update_weights: {name} has shape \(1,\), the model's is \({tensor.numel()},\) \(the valid"
    with pytest.raises(ValueError, match=culprit):
        engine.update_weights(broadcastable)
    state = dict(iter_state_dict(engine.model))
    assert engine.policy_version == 0
    tied = {"lm_head.weight"}  # shares storage with the embedding, which comes first and is copied
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    for i, (n, t) in enumerate(new):  # streamed: the tensors before the bad one are copied, none after
        if n not in tied:
            assert torch.equal(state[n], t if i < norm else before[n]), n
    both = r"typo\.weight \(shape \(1,\)\) is not a weight of this model; lm_head\.weight has shape \(2, 2\)"
    with pytest.raises(KeyError, match=both):
        engine.update_weights([("typo.weight", torch.zeros(1)), ("lm_head.weight", torch.zeros(2, 2)), *new])
    engine.update_weights(new)  # a complete valid set afterwards repairs the model
    assert engine.policy_version == 1
    assert all(torch.equal(t, dict(new)[n]) for n, t in iter_state_dict(engine.model))


def test_rollout_metrics_hand_example() -> None:
    """Two samples, 3 + 5 response tokens in 2 s: 4 tok/s, mean 4, max 5, one stop, one length."""
    samples = [
        Sample(0, [1, 2], [3, 4, 5], "", [0.0] * 3, "stop", 0),
        Sample(0, [1, 2], [3, 4, 5, 6, 7], "", [0.0] * 5, "length", 0),
    ]
    m = rollout_metrics(samples, 2.0)
    assert m["rollout/output_tokens_per_s"] == 4.0
    assert m["rollout/prompt_tokens"] == 4.0
    assert (m["rollout/response_len_mean"], m["rollout/response_len_max"]) == (4.0, 5.0)
    assert (m["rollout/finish_stop"], m["rollout/finish_length"]) == (1.0, 1.0)


# ---- weight streaming: each optimised path against its naive twin (the full state dict) --------------------------
def test_iter_state_dict_equals_state_dict_with_tied_alias(tiny_qwen2_path: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)
    streamed = list(iter_state_dict(model))
    naive = model.state_dict()
    assert [n for n, _ in streamed] == list(naive)
    assert "lm_head.weight" in naive  # the tied alias vLLM needs
    for name, tensor in streamed:
        assert tensor.data_ptr() == naive[name].data_ptr()  # views, no copies


def test_model_weights_plain_module_streams_views(tiny_qwen2_path: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)
    weights = WeightStream(model, bucket_mb=0.01)
    assert not weights.is_zero3
    naive = model.state_dict()
    assert [(n, t.data_ptr()) for n, t in weights] == [(n, t.data_ptr()) for n, t in naive.items()]
    assert [(m.name, m.shape) for m in weights.metadata()] == [(n, tuple(t.shape)) for n, t in naive.items()]
    assert [n for n, _ in weights] == list(naive)  # re-iterable


def test_convert_bucketed_equals_naive(tiny_qwen2_path: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)
    naive = {n: t.to(torch.bfloat16) for n, t in model.state_dict().items()}
    converted = dict(convert_bucketed(iter_state_dict(model), "cpu", torch.bfloat16, bucket_bytes=64 << 10))
    assert list(converted) == list(naive)
    assert all(torch.equal(converted[n], naive[n]) and converted[n].dtype == torch.bfloat16 for n in naive)
    same = dict(convert_bucketed(iter_state_dict(model), "cpu", None, bucket_bytes=64 << 10))
    assert all(
        same[n].data_ptr() == t.data_ptr() for n, t in model.state_dict().items()
    )  # nothing to do: no copy


def test_safetensors_shards_equal_naive(tiny_qwen2_path: str, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)
    out = tmp_path / "v000001"
    written = write_safetensors_shards(iter_state_dict(model), out, bucket_bytes=256 << 10)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "v000001.tmp").exists()
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        loaded.update(load_file(str(shard)))
    naive = model.state_dict()
    assert set(loaded) == set(naive)
    assert all(torch.equal(loaded[n], naive[n]) for n in naive)
    assert written == sum(t.numel() * t.element_size() for t in naive.values())


@pytest.mark.gpu
def test_model_weights_zero3_gathers_bucket_by_bucket(tiny_qwen2_path: str) -> None:
    """Under ZeRO-3 `WeightStream` yields full tensors equal to the unpartitioned model's state dict."""
    deepspeed = pytest.importorskip("deepspeed")
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29513")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    reference = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path).state_dict()
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_path)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
    }
    ds_engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    weights = WeightStream(ds_engine.module, bucket_mb=0.05)
    assert weights.is_zero3
    streamed = dict(weights)
    assert list(streamed) == list(reference)
    assert all(torch.equal(streamed[n].cpu(), reference[n]) for n in reference)
    assert [m.shape for m in weights.metadata()] == [tuple(t.shape) for t in reference.values()]
