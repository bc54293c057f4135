"""vLLM engine on CPU (real vLLM, one engine shared by the module) checked against the HF reference engine.

Every test first syncs the weights it needs, so tests do not depend on each other's order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import perturbed, rolled_token_rows, tiny_vllm_engine
from packaging.version import Version
from transformers import AutoModelForCausalLM

from rollout.engines.hf import HFEngine
from rollout.engines.protocol import RolloutEngine, SamplingConfig
from rollout.engines.vllm import VLLMEngine, set_weight_version
from rollout.weights import WeightCheck, WeightStream, checkpoint_shapes, iter_state_dict
from trainer.sync import StaleWeightProbe

pytestmark = pytest.mark.vllm

GREEDY = SamplingConfig(max_tokens=16, temperature=0.0, min_tokens=0, stop=())


@pytest.fixture(scope="module")
def engine(tiny_qwen2_path: str) -> Iterator[VLLMEngine]:
    e = tiny_vllm_engine(tiny_qwen2_path)
    yield e
    e.close()


def load(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def eos_heavy(path: str, token: int) -> torch.nn.Module:
    """EOS (id 0) embedding = 3 × `token`'s: the tiny model repeats its last token, so after `token` it stops."""
    model = load(path)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[0] = 3 * emb[token]
    return model


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def test_engine_and_structures_match_hf(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """Same protocol, same Sample fields, same tokenisation of text prompts, same greedy tokens."""
    learner = load(tiny_qwen2_path)
    engine.update_weights(iter_state_dict(learner))
    hf = HFEngine(learner, tiny_qwen2_path)
    assert isinstance(engine, RolloutEngine) and isinstance(hf, RolloutEngine)
    prompts = ["What is 2 + 3?", [5, 6, 7]]
    ours, ref = engine.generate(prompts, GREEDY), hf.generate(prompts, GREEDY)
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref, strict=True):
        assert type(a) is type(b)
        assert {k: type(v) for k, v in vars(a).items()} == {k: type(v) for k, v in vars(b).items()}
        assert (a.prompt_index, a.prompt_ids, a.response_ids, a.text, a.finish_reason) == (
            b.prompt_index, b.prompt_ids, b.response_ids, b.text, b.finish_reason,
        )  # fmt: skip
        assert max_diff(a.logprobs, b.logprobs) < 1e-4
        assert a.policy_version == engine.policy_version
    m = engine.metrics
    assert m["rollout/output_tokens"] == 32 and m["rollout/output_tokens_per_s"] > 0
    assert m["rollout/prompt_tokens"] == len(ours[0].prompt_ids) + 3
    assert (m["rollout/response_len_max"], m["rollout/finish_length"], m["rollout/finish_stop"]) == (16, 2, 0)


def test_max_tokens_and_n_grouping(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    samples = engine.generate([[5, 6, 7], [8, 9], [10]], SamplingConfig(max_tokens=5, n=4, seed=0))
    assert [s.prompt_index for s in samples] == [i for i in range(3) for _ in range(4)]
    assert all(len(s.response_ids) == len(s.logprobs) == 5 and s.finish_reason == "length" for s in samples)
    assert all(lp <= 0 and math.isfinite(lp) for s in samples for lp in s.logprobs)


def test_greedy_with_n_gives_n_equal_samples_like_hf(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """temperature 0 with n=3 (e.g. a GRPO group sampled greedily): 3 samples per prompt, each the greedy one,
    as the HF engine gives (vLLM itself refuses n > 1 with greedy sampling: it raised VLLMValidationError)."""
    learner = perturbed(tiny_qwen2_path, seed=7)
    engine.update_weights(iter_state_dict(learner))
    hf = HFEngine(learner, tiny_qwen2_path)
    params = SamplingConfig(max_tokens=6, temperature=0.0, min_tokens=0, stop=(), n=3, seed=1)
    ours, ref = engine.generate([[5, 6, 7], "What is"], params), hf.generate([[5, 6, 7], "What is"], params)
    assert [s.prompt_index for s in ours] == [s.prompt_index for s in ref] == [0, 0, 0, 1, 1, 1]
    for a, b in zip(ours, ref, strict=True):
        assert (a.prompt_ids, a.response_ids, a.text, a.finish_reason) == (
            b.prompt_ids, b.response_ids, b.text, b.finish_reason,
        )  # fmt: skip
        assert max_diff(a.logprobs, b.logprobs) < 1e-4
    ours[0].response_ids.append(-1)  # each sample owns its lists
    assert ours[1].response_ids == ref[1].response_ids
    assert engine.metrics["rollout/samples"] == 6 and engine.metrics["rollout/output_tokens"] == 36


def test_one_prompt_for_the_list_of_prompts_is_refused(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """A bare str was generated for character by character, a flat id list id by id (one sample per id): both
    are TypeErrors now, as in the HF engine."""
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    params = SamplingConfig(max_tokens=2, min_tokens=0, stop=(), seed=0)
    with pytest.raises(TypeError, match="got a bare str"):
        engine.generate("What is", params)
    with pytest.raises(TypeError, match="got a flat list of token ids"):
        engine.generate([5, 6, 7], params)


def test_group_samples_differ_and_seed_reproduces(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """Identical prompts with one seed: all 2 × 4 samples differ; the same seed gives the same samples."""
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    params = SamplingConfig(max_tokens=8, n=4, seed=11)
    first = [tuple(s.response_ids) for s in engine.generate([[5, 6, 7], [5, 6, 7]], params)]
    assert len(set(first)) == 8
    again = [tuple(s.response_ids) for s in engine.generate([[5, 6, 7], [5, 6, 7]], params)]
    assert again == first
    shard = engine.generate([[5, 6, 7]], replace(params, first_index=1))  # the batch's second prompt, alone
    assert [tuple(s.response_ids) for s in shard] == first[4:]
    other = [
        tuple(s.response_ids)
        for s in engine.generate([[5, 6, 7], [5, 6, 7]], SamplingConfig(max_tokens=8, n=4, seed=12))
    ]
    assert set(other).isdisjoint(first)  # seed + 1 shares no sample streams with seed
    unseeded = [
        tuple(s.response_ids) for s in engine.generate([[5, 6, 7]], SamplingConfig(max_tokens=8, n=4))
    ]
    assert len(set(unseeded)) == 4


def test_min_tokens_and_eos_match_hf(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """EOS stops (kept in the ids), but not before min_tokens; vLLM and HF agree token for token."""
    learner = eos_heavy(tiny_qwen2_path, 7)
    engine.update_weights(iter_state_dict(learner))
    hf = HFEngine(learner, tiny_qwen2_path)
    for min_tokens, expected_len in [(0, 1), (4, 5)]:
        params = SamplingConfig(max_tokens=10, temperature=0.0, min_tokens=min_tokens)
        (ours,), (ref,) = engine.generate([[5, 6, 7]], params), hf.generate([[5, 6, 7]], params)
        assert ours.response_ids == ref.response_ids
        assert len(ours.response_ids) == expected_len and ours.response_ids[-1] == 0
        assert 0 not in ours.response_ids[:min_tokens]
        assert ours.finish_reason == "stop" and ours.text == ref.text
        assert max_diff(ours.logprobs, ref.logprobs) < 1e-4  # processed: EOS masked while < min_tokens


def test_stop_string_kept_in_output(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """A seeded sample cut by a stop string: same tokens up to it, text ends with it (kept), finish 'stop'."""
    learner = perturbed(tiny_qwen2_path)
    engine.update_weights(iter_state_dict(learner))
    (full,) = engine.generate([[5, 6, 7]], SamplingConfig(max_tokens=30, seed=5, stop=()))
    stop = engine.tokenizer.decode(full.response_ids[8:10])
    (cut,) = engine.generate([[5, 6, 7]], SamplingConfig(max_tokens=30, seed=5, stop=(stop,), min_tokens=4))
    assert cut.finish_reason == "stop" and cut.text.endswith(stop)
    start = full.text.find(stop, len(engine.tokenizer.decode(full.response_ids[:4])))
    assert cut.text == full.text[: start + len(stop)]
    assert cut.response_ids == full.response_ids[: len(cut.response_ids)] and len(cut.response_ids) <= 10
    # greedy with a stop string: HF cuts at the same place
    hf = HFEngine(learner, tiny_qwen2_path)
    (g,) = hf.generate([[5, 6, 7]], GREEDY)
    greedy_stop = SamplingConfig(
        max_tokens=16, temperature=0.0, stop=(hf.tokenizer.decode(g.response_ids[5:6]),)
    )
    (a,), (b,) = engine.generate([[5, 6, 7]], greedy_stop), hf.generate([[5, 6, 7]], greedy_stop)
    assert (a.response_ids, a.text, a.finish_reason) == (b.response_ids, b.text, b.finish_reason)
    assert a.finish_reason == "stop"


def cached_prompt(engine: VLLMEngine) -> list[int]:
    """A prompt filling two prefix-cache blocks and a few tokens more: vLLM caches whole blocks only (the
    block size is the engine's: 128 tokens on vLLM's CPU backend), and always recomputes the last token."""
    block = engine.cache_block_size
    assert 2 * block + 7 + GREEDY.max_tokens <= engine.max_model_len
    return [5, 6, 7, *(40 + (11 * i) % 900 for i in range(2 * block + 4))]


def test_weight_update_matches_hf_and_resets_prefix_cache(
    engine: VLLMEngine, tiny_qwen2_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After syncing trained (perturbed) weights, greedy continuations equal HF's and log-probs agree ≤ 1e-4.

    The prompt fills two prefix-cache blocks and is generated once under the old weights first, so a stale
    prefix-cache entry would show, and does: with vLLM's reset stubbed out the continuation's log-probs are
    off from the learner's by tenths (the test sees the bug it guards against).
    """
    prompt = cached_prompt(engine)
    learner = perturbed(tiny_qwen2_path, seed=2)
    hf = HFEngine(learner, tiny_qwen2_path)
    (ref,) = hf.generate([prompt], GREEDY)

    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    engine.generate([prompt], GREEDY)  # caches the prompt's blocks under the old weights
    with monkeypatch.context() as patch:
        patch.setattr(engine.llm, "reset_prefix_cache", lambda *args, **kwargs: True)
        engine.update_weights(WeightStream(learner, bucket_mb=0.1))
    (stale,) = engine.generate([prompt], GREEDY)
    stale_diff = max_diff(stale.logprobs, hf.score(prompt, stale.response_ids, GREEDY))
    assert stale_diff > 1e-2, stale_diff  # the learner's log-probs of the engine's own tokens

    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    (before,) = engine.generate([prompt], GREEDY)  # cached under the old weights again
    version = engine.policy_version
    engine.update_weights(WeightStream(learner, bucket_mb=0.1))  # with the reset
    assert engine.policy_version == version + 1
    assert engine.metrics["rollout/sync_gb"] > 0 and engine.metrics["rollout/sync_gb_per_s"] > 0
    (after,) = engine.generate([prompt], GREEDY)
    assert after.response_ids == ref.response_ids != before.response_ids
    assert max_diff(after.logprobs, ref.logprobs) <= 1e-4
    assert after.policy_version == version + 1
    seq = [prompt + ref.response_ids]
    assert max_diff(engine.prompt_logprobs(seq)[0], hf.prompt_logprobs(seq)[0]) <= 1e-4


def test_failed_prefix_cache_reset_raises_and_blocks_generation(
    engine: VLLMEngine, tiny_qwen2_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's ``reset_prefix_cache()`` answering False (blocks still in use) is an error, not a log line:
    no version bump, no generation until a sync resets it."""
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    version = engine.policy_version
    with monkeypatch.context() as patch:
        patch.setattr(engine.llm, "reset_prefix_cache", lambda *args, **kwargs: False)
        with pytest.raises(RuntimeError, match="reset_prefix_cache\\(\\) returned False"):
            engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    assert engine.policy_version == version
    with pytest.raises(RuntimeError, match="prefix cache could not be reset"):
        engine.generate([[5, 6, 7]], GREEDY)
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    assert engine.policy_version == version + 1 and engine.generate([[5, 6, 7]], GREEDY)


# ---- sync validation -------------------------------------------------------------------------------------------
V_PROJ = "model.layers.0.self_attn.v_proj.weight"


def test_checkpoint_shapes_are_the_learners_state_dict(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """The names and shapes syncs are checked against: the learner's `iter_state_dict`, tied lm_head too."""
    learner = load(tiny_qwen2_path)
    expected = {name: tuple(t.shape) for name, t in iter_state_dict(learner)}
    assert engine.weight_shapes == expected and "lm_head.weight" in expected
    assert checkpoint_shapes(learner.config) == expected


def test_wrong_shape_is_named_before_vllm_sees_it(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """A plain stream with a wrong-shaped tensor: ValueError names it and both shapes; the stream is cut there
    (vLLM never sees it) but still read to the end (a ZeRO-3 gather on other ranks keeps in step); the
    engine refuses to generate (half its layers are new) until a full sync, which restores it exactly."""
    learner = perturbed(tiny_qwen2_path, seed=6)
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    version = engine.policy_version
    read: list[str] = []

    def bad() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iter_state_dict(learner):
            read.append(name)
            yield name, (tensor[:-1] if name == V_PROJ else tensor)

    with pytest.raises(
        ValueError, match=f"{V_PROJ} has shape \\(127, 128\\), the checkpoint's is \\(128, 128\\)"
    ):
        engine.update_weights(bad())
    assert read == [name for name, _ in iter_state_dict(learner)]
    assert engine.policy_version == version
    for call in (lambda: engine.generate([[5, 6, 7]], GREEDY), lambda: engine.prompt_logprobs([[5, 6, 7]])):
        with pytest.raises(
            RuntimeError, match=f"partial weight update \\(the update after policy version {version}"
        ):
            call()
    engine.update_weights(iter_state_dict(learner))
    hf = HFEngine(learner, tiny_qwen2_path)
    (ours,), (ref,) = engine.generate([[5, 6, 7]], GREEDY), hf.generate([[5, 6, 7]], GREEDY)
    assert ours.response_ids == ref.response_ids and max_diff(ours.logprobs, ref.logprobs) <= 1e-4
    assert engine.policy_version == version + 1


def test_metadata_is_checked_before_anything_is_sent(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """`WeightStream` lists its names and shapes up front: a wrong shape there is found before the first
    tensor moves, and the engine keeps its weights, its version and its ability to generate."""
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    (before,) = engine.generate([[5, 6, 7]], GREEDY)
    version = engine.policy_version
    model = perturbed(tiny_qwen2_path, seed=7)
    model.model.layers[0].self_attn.v_proj.weight = torch.nn.Parameter(torch.zeros(127, 128))
    weights = RecordingWeights(model)
    with pytest.raises(ValueError, match=f"{V_PROJ} has shape .* Nothing was sent .* keeps policy version"):
        engine.update_weights(weights)
    assert weights.yielded == [] and engine.policy_version == version
    assert engine.generate([[5, 6, 7]], GREEDY)[0].response_ids == before.response_ids


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown", "no.such.weight \\(shape \\(3,\\)\\) is not a weight of this checkpoint"),
        ("truncated", "no tensor sent for 2 of the checkpoint's 27 names: model.norm.weight, lm_head.weight"),
        ("named_parameters", "no tensor sent for 1 .*: lm_head.weight \\(a tied lm_head .* named_parameters"),
        ("twice", "model.embed_tokens.weight was sent twice"),
    ],
)
def test_incomplete_or_unknown_names_raise(
    engine: VLLMEngine, tiny_qwen2_path: str, case: str, message: str
) -> None:
    """Names vLLM would silently skip or half-load are errors and never bump the version. A tied lm_head left
    out (``named_parameters()``) is an error on every vLLM version, though 0.26 would share the embedding."""
    learner = perturbed(tiny_qwen2_path, seed=8)
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    version = engine.policy_version
    full = list(iter_state_dict(learner))
    weights = {
        "unknown": [("no.such.weight", torch.zeros(3)), *full],
        "truncated": full[:-2],
        "named_parameters": [(n, p.detach()) for n, p in learner.named_parameters()],
        "twice": full + full[:1],
    }[case]
    with pytest.raises(ValueError, match=message):
        engine.update_weights(weights)
    assert engine.policy_version == version
    if case == "unknown":  # the first pair was wrong: nothing reached vLLM, the engine is as it was
        assert engine.generate([[5, 6, 7]], GREEDY)
    else:
        with pytest.raises(RuntimeError, match="partial weight update"):
            engine.generate([[5, 6, 7]], GREEDY)
    engine.update_weights(iter(full))
    assert engine.policy_version == version + 1 and engine.generate([[5, 6, 7]], GREEDY)


def test_failed_reload_marks_the_engine_broken(
    engine: VLLMEngine, tiny_qwen2_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If vLLM's reload itself raises part-way (its layers are then left on the meta device, so every later
    call would fail with "Tensor on device meta"), the error passes through and every later call says the
    engine is broken. (vLLM is stubbed here, so the shared engine survives; the real failure is the one
    `test_wrong_shape_is_named_before_vllm_sees_it` now prevents.)"""
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    version = engine.policy_version

    def failing_rpc(method: str, kwargs: dict[str, Any]) -> None:
        next(kwargs["weights_iterator"])
        raise RuntimeError("start (0) + length (128) exceeds dimension size (127)")

    monkeypatch.setattr(engine.llm, "collective_rpc", failing_rpc)
    try:
        with pytest.raises(RuntimeError, match="exceeds dimension size"):
            engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
        broken = f"broken after a failed weight update at policy version {version} .*; recreate it"
        for call in (
            lambda: engine.generate([[5, 6, 7]], GREEDY),
            lambda: engine.prompt_logprobs([[5, 6, 7]]),
            lambda: engine.update_weights(iter_state_dict(load(tiny_qwen2_path))),
            engine.weight_checksums,
        ):
            with pytest.raises(RuntimeError, match=broken):
                call()
    finally:
        engine._broken = None  # vLLM was never touched: the shared engine is fine
    monkeypatch.undo()
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))


def test_weight_check_without_checkpoint_shapes(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """Where transformers cannot build the model from its config, the first full sync's names and shapes
    become the reference; until then only repeated names are errors."""
    check = WeightCheck(None)
    assert check.listing([("a", (2,)), ("b", (3,))]) is None
    assert check.listing([("a", (2,))]) == "a was sent twice"
    expected = engine.weight_shapes
    engine.weight_shapes = None
    try:
        engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
        assert engine.weight_shapes == expected
    finally:
        engine.weight_shapes = expected


def test_sampled_logprobs_are_the_sampling_distribution(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """vLLM's sampled-token log-probs (temperature 0.7, top-p 0.9) equal HF's teacher-forced rescoring."""
    learner = perturbed(tiny_qwen2_path, seed=3)
    engine.update_weights(iter_state_dict(learner))
    hf = HFEngine(learner, tiny_qwen2_path)
    params = SamplingConfig(max_tokens=12, temperature=0.7, top_p=0.9, n=2, seed=4)
    for s in engine.generate([[5, 6, 7], "What is"], params):
        assert max_diff(s.logprobs, hf.score(s.prompt_ids, s.response_ids, params)) <= 1e-4


def test_bucketed_sync_equals_naive_full_state_dict(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """Naive twin: one ``reload_weights`` over a full ``state_dict()`` copy. Bit-identical engine weights."""
    learner = perturbed(tiny_qwen2_path, seed=4)
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    base = engine.weight_checksums()
    engine.llm.collective_rpc(
        "reload_weights",
        kwargs={"weights_iterator": iter(learner.state_dict().items()), "is_checkpoint_format": True},
    )
    naive = engine.weight_checksums()
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    assert engine.weight_checksums() == base
    engine.update_weights(WeightStream(learner, bucket_mb=0.05))
    assert engine.weight_checksums() == naive != base


def test_checksums_flag_exactly_the_changed_parameter(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """`weight_checksums` (``LLM.apply_model``, the path vLLM 0.26 has too) agree across identical syncs and,
    after one element of one weight changes, differ for that parameter alone: a norm weight here, and q_proj's
    bias, which vLLM fuses into qkv_proj. (On CPU vLLM keeps linear weights inside packed kernels and leaves
    their ``weight`` parameters empty, so those are not what this test changes.)"""
    learner = load(tiny_qwen2_path)
    engine.update_weights(iter_state_dict(learner))
    base = engine.weight_checksums()
    assert "model.layers.0.self_attn.qkv_proj.bias" in base  # bare vLLM names, no rank prefix
    engine.update_weights(WeightStream(learner, bucket_mb=0.05))
    assert engine.weight_checksums() == base
    for hf_name, vllm_name in [
        ("model.layers.1.post_attention_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"),
        ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.qkv_proj.bias"),
    ]:
        model = load(tiny_qwen2_path)
        with torch.no_grad():
            model.get_parameter(hf_name)[5] += 1e-3
        engine.update_weights(iter_state_dict(model))
        changed = {name for name, digest in engine.weight_checksums().items() if digest != base[name]}
        assert changed == {vllm_name}


def test_checksums_equal_vllm_rpc(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """Naive twin (vLLM >= 0.32): vLLM's own ``compute_weight_checksums`` RPC, its ``dp0:pp0:pcp0:tp0:``
    prefix stripped, gives the same digest for every parameter, before and after a sync that changes them."""
    if Version(engine.vllm_version).release[:2] < (0, 32):
        pytest.skip("vLLM < 0.32 has no compute_weight_checksums RPC")
    for model in (load(tiny_qwen2_path), perturbed(tiny_qwen2_path, seed=5)):
        engine.update_weights(iter_state_dict(model))
        (rpc,) = engine.llm.collective_rpc("compute_weight_checksums")
        assert all(key.startswith("dp0:pp0:pcp0:tp0:") for key in rpc)
        assert {key.rsplit(":", 1)[1]: digest for key, digest in rpc.items()} == engine.weight_checksums()


def test_weight_version_is_stamped_where_vllm_has_it(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """vLLM 0.32 gets `policy_version` as its weight version; an LLM without ``update_weight_version``
    (vLLM 0.26; here a plain object) is skipped, not an error."""
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    if Version(engine.vllm_version).release[:2] >= (0, 32):
        assert engine.llm.get_weight_version() == str(engine.policy_version)
        assert set_weight_version(engine.llm, 1234) and engine.llm.get_weight_version() == "1234"
        set_weight_version(engine.llm, engine.policy_version)
    assert set_weight_version(object(), 7) is False


def test_a_stream_with_a_version_sets_it(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    """A `WeightStream` that carries a version (a resumed run's) gives the engine that policy version (and
    vLLM's weight version where it has one); the next sync continues from it."""
    engine.update_weights(WeightStream(load(tiny_qwen2_path), version=41))
    assert engine.policy_version == 41 and engine.generate([[5, 6, 7]], GREEDY)[0].policy_version == 41
    if Version(engine.vllm_version).release[:2] >= (0, 32):
        assert engine.llm.get_weight_version() == "41"
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    assert engine.policy_version == 42


class RecordingWeights(WeightStream):
    """`WeightStream` that records the names its iteration yields."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.yielded: list[str] = []

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in super().__iter__():
            self.yielded.append(name)
            yield name, tensor


def test_sleep_and_wake_are_noops_on_cpu(engine: VLLMEngine, tiny_qwen2_path: str) -> None:
    engine.update_weights(iter_state_dict(load(tiny_qwen2_path)))
    (before,) = engine.generate([[5, 6, 7]], GREEDY)
    assert engine.sleep_supported is torch.cuda.is_available()
    assert not engine.dedicated and (engine.device is None) is not torch.cuda.is_available()  # CPU: no GPU
    engine.sleep()
    engine.wake()
    assert engine.generate([[5, 6, 7]], GREEDY)[0].response_ids == before.response_ids


def test_sleep_from_a_partial_wake_releases_everything() -> None:
    """After a sync only the weights are awake (`update_weights` wakes that pool alone); `sleep` then must
    not return early with the weights left on the GPU: it wakes the KV cache and sleeps whole. The sleep
    mode itself needs CUDA, so vLLM's LLM is a recording stand-in here (the calls are what is checked)."""

    class RecordingLLM:
        def __init__(self) -> None:
            self.calls: list[tuple[str, object]] = []

        def wake_up(self, tags: list[str]) -> None:
            self.calls.append(("wake_up", tags))

        def sleep(self, level: int) -> None:
            self.calls.append(("sleep", level))

    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM start-up: only the sleep bookkeeping runs
    llm = RecordingLLM()
    engine._llm, engine.device, engine._sleep_enabled, engine.sleep_level = llm, None, True, 1
    engine._asleep = {"kv_cache"}
    engine.sleep()
    assert llm.calls == [("wake_up", ["kv_cache"]), ("sleep", 1)]
    assert engine._asleep == {"weights", "kv_cache"}
    engine.sleep()  # already asleep: nothing more
    assert len(llm.calls) == 2


# ---- GPU ---------------------------------------------------------------------------------------------------------
def qwen_math_15b_shaped(out: Path, tokenizer_path: str) -> str:
    """A random model with Qwen2.5-Math-1.5B's shapes (bf16), saved with the tiny tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=True, torch_dtype="bfloat16", bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # peaked next-token distributions (logit std ~4), not near-uniform ones
        model.get_input_embeddings().weight.mul_(5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(out)
    return str(out)


@pytest.mark.gpu
def test_gpu_bf16_colocated_generate_sleep_sync_probe(tmp_path: Path, tiny_qwen2_path: str) -> None:
    from trainer.sync import StaleWeightsError

    path = qwen_math_15b_shaped(tmp_path / "math15b", tiny_qwen2_path)
    learner = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    engine = VLLMEngine(
        path, dtype="bfloat16", gpu_memory_utilization=0.35, max_model_len=1024, sleep_level=1
    )
    try:
        assert engine.sleep_supported
        assert not engine.dedicated and engine.device == torch.device("cuda", torch.cuda.current_device())
        params = SamplingConfig(max_tokens=32, n=4, seed=0)
        samples = engine.generate(["What is 2 + 3?", [5, 6, 7]], params)
        assert len(samples) == 8 and len({tuple(s.response_ids) for s in samples[:4]}) == 4
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert torch.cuda.mem_get_info()[0] > free_awake + (2 << 30)  # weights + KV cache released
        with torch.no_grad():  # a pretend optimizer step while vLLM sleeps
            for p in learner.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        engine.update_weights(WeightStream(learner, bucket_mb=128))  # wakes the weights only
        probe = StaleWeightProbe(tokenizer=engine.tokenizer, dtype=torch.bfloat16)
        result = probe(engine, learner)
        assert result.ok, result
        assert engine.generate(["What is 2 + 3?"], params)[0].policy_version == 1
        engine.update_weights(rolled_token_rows(learner))
        with pytest.raises(StaleWeightsError):
            probe(engine, learner)
    finally:
        engine.close()


@pytest.mark.gpu
def test_gpu_dedicated_device(tiny_qwen2_path: str) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("dedicated-device mode needs two GPUs")
    torch.cuda.set_device(0)
    learner = perturbed(tiny_qwen2_path).cuda(0)
    engine = VLLMEngine(
        tiny_qwen2_path, device="cuda:1", dtype="float32", gpu_memory_utilization=0.2, max_model_len=512
    )
    try:
        assert torch.cuda.current_device() == 0  # the learner's device is left alone
        assert engine.dedicated and engine.device == torch.device("cuda", 1)
        assert not engine.sleep_supported
        engine.update_weights(WeightStream(learner))
        assert StaleWeightProbe(tokenizer=engine.tokenizer)(engine, learner).ok
        hf = HFEngine(learner, tiny_qwen2_path)
        assert (
            engine.generate([[5, 6, 7]], GREEDY)[0].response_ids
            == hf.generate([[5, 6, 7]], GREEDY)[0].response_ids
        )
        assert torch.cuda.current_device() == 0
        assert (
            torch.cuda.memory_reserved(1) > 0 or torch.cuda.mem_get_info(1)[0] < torch.cuda.mem_get_info(1)[1]
        )
    finally:
        engine.close()
