"""A plain-transformers `RolloutEngine`: the fallback where vLLM is missing, and the reference it is tested
against, with vLLM's sampling semantics:

- sample k of prompt i draws from its own ``torch.Generator`` seeded ``SamplingConfig.seed_of(i, k)`` (vLLM's
  seed for it; the streams differ from vLLM's, so only greedy decoding matches token for token);
- ``min_tokens``: EOS is masked for the first ``min_tokens`` tokens, and a stop string counts only if it
  *ends* after their text (vLLM's ``BaseIncrementalDetokenizer.update`` rule); EOS ends a sample and stays
  in ``response_ids``; ``text`` skips special tokens;
- a stop string ends a sample with ``finish_reason="stop"`` and the text is cut right after it
  (``include_stop_str_in_output=True``); the token ids are all tokens generated;
- ``Sample.logprobs`` follow `LogprobsMode` (``processed`` by default: the distribution sampled from);
- the model's positions are its ``max_model_len``: a sample ends with ``finish_reason="length"`` when prompt
  and response fill them, and a prompt that leaves no room for one token is refused, as vLLM refuses it.

Rows (prompt × sample) are left-padded in batches of ``batch_size`` and decoded with a KV cache; meant for
tiny models, tests and debugging, not throughput.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from rollout.engines.protocol import (
    FinishReason,
    LogprobsMode,
    Prompt,
    Sample,
    SamplingConfig,
    check_prompts,
    rollout_metrics,
)
from rollout.weights import WeightCheck, iter_state_dict, next_version, sync_metrics

logger = logging.getLogger(__name__)

_PARTIAL = " (the valid tensors sent before the first problem were copied: the model may be partly updated)"


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (set -inf) logits outside the top-p nucleus, exactly as vLLM's ``apply_top_k_top_p``.

    logits: (rows, vocab). Sort ascending, drop tokens whose cumulative probability is <= 1 - top_p,
    always keep the most likely token.

    >>> top_p_mask(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.6).isinf().tolist()
    [[False, False, True]]
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def process_logits(
    logits: torch.Tensor, step: int, params: SamplingConfig, eos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, processed) log-probs for response position `step` from float32 logits (rows, vocab).

    Processed = vLLM's sampler order: min-tokens EOS mask, then (unless greedy) temperature and top-p.
    """
    raw = torch.log_softmax(logits, dim=-1)
    if step < params.min_tokens:
        logits = logits.index_fill(-1, eos, float("-inf"))
    if not params.greedy:
        logits = top_p_mask(logits / params.temperature, params.top_p)
    return raw, torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module, token_ids: Sequence[Sequence[int]], batch_size: int = 8
) -> list[list[float]]:
    """log p(token_t | tokens_<t) for t >= 1 of each sequence, in float32, under `model` (eval mode), with the
    learner's max-shifted log-softmax (`trainer.logprobs`), so a module shared with the learner scores the same.

    Sequences are right-padded per batch; the model is put in eval mode for the call and restored.
    Under DeepSpeed ZeRO-3 every rank must call this (the forward gathers parameters collectively).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out: list[list[float]] = []
        for start in range(0, len(token_ids), batch_size):
            chunk = [list(map(int, s)) for s in token_ids[start : start + batch_size]]
            width = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, s)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, s)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (b, s-1, vocab)
            shifted = logits - logits.amax(dim=-1, keepdim=True)  # the learner's log-softmax, to the last bit
            logp = (shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)).gather(-1, ids[:, 1:, None])[..., 0]
            out.extend(logp[row, : len(seq) - 1].tolist() for row, seq in enumerate(chunk))
        return out
    finally:
        model.train(was_training)


class HFEngine:
    """`RolloutEngine` on a transformers causal LM.

    Args:
        model: a checkpoint path (loaded with ``AutoModelForCausalLM.from_pretrained``) or a live module.
            A live module is *shared*, not copied: the engine then always samples from the learner's
            current weights, and `update_weights` only bumps the version (copies onto itself are skipped).
        tokenizer: a tokenizer or a path; defaults to the model path (required with a live module).
        device: where to run; defaults to the module's device, else CUDA when available, else CPU.
        dtype: load dtype for a path (``"auto"`` keeps the checkpoint's).
        batch_size: rows (prompt × sample) decoded together.
        logprobs_mode: see `LogprobsMode`.
    """

    def __init__(
        self,
        model: str | torch.nn.Module,
        tokenizer: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        batch_size: int = 64,
        logprobs_mode: LogprobsMode = "processed",
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._owns_model = isinstance(model, str)
        if isinstance(model, str):
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            loaded: torch.nn.Module = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
            self.model = loaded.to(device)
            tokenizer = tokenizer if tokenizer is not None else model
        else:
            self.model = model
            if device is None:
                device = next(model.parameters()).device
        if tokenizer is None:
            raise ValueError("HFEngine: pass `tokenizer` (a tokenizer or path) when `model` is a module")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.logprobs_mode = logprobs_mode
        self._policy_version = 0
        self.metrics: dict[str, float] = {}
        self._sleeping = False
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        )

    @property
    def policy_version(self) -> int:
        """The version of the weights samples come from; advanced by `update_weights` only."""
        return self._policy_version

    @property
    def max_model_len(self) -> int | None:
        """The model's positions (``max_position_embeddings`` / ``n_positions``), the prompt + response token
        limit; None where its config names none."""
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return int(limit) if isinstance(limit, int) else None

    @property
    def cache_block_size(self) -> int | None:
        """No prefix cache."""
        return None

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingConfig) -> list[Sample]:
        """`params.n` samples per prompt, grouped: samples of prompt i are at [i*n, (i+1)*n)."""
        check_prompts(prompts)
        if self._sleeping:
            self.wake()
        start = time.perf_counter()
        prompt_ids = [self._encode(p) for p in prompts]
        for i, ids in enumerate(prompt_ids):
            self._check_prompt(i, ids)
        rows = [(i, k) for i in range(len(prompt_ids)) for k in range(params.n)]
        samples: list[Sample] = []
        for lo in range(0, len(rows), self.batch_size):
            batch = rows[lo : lo + self.batch_size]
            samples.extend(self._generate_rows([prompt_ids[i] for i, _ in batch], batch, params))
        self.metrics.update(rollout_metrics(samples, time.perf_counter() - start))
        return samples

    @torch.no_grad()
    def _generate_rows(
        self, prompts: list[list[int]], rows: list[tuple[int, int]], params: SamplingConfig
    ) -> list[Sample]:
        was_training = self.model.training
        self.model.eval()
        try:
            return self._decode(prompts, rows, params)
        finally:
            self.model.train(was_training)

    def _decode(
        self, prompts: list[list[int]], rows: list[tuple[int, int]], params: SamplingConfig
    ) -> list[Sample]:
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)  # (b, s) left-padded
        mask = torch.zeros(b, width, dtype=torch.long)  # (b, s)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, s)
        generators = [self._generator(params.seed_of(i, k)) for i, k in rows]
        limit = self.max_model_len
        budgets = [params.max_tokens if limit is None else min(params.max_tokens, limit - len(p)) for p in prompts]
        greedy = params.greedy  # vLLM samples greedily below GREEDY_EPS
        responses: list[list[int]] = [[] for _ in range(b)]
        logprobs: list[list[float]] = [[] for _ in range(b)]
        finish: list[FinishReason | None] = [None] * b
        texts: list[str] = [""] * b
        eos = torch.tensor(self.eos_ids, device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()  # (b, vocab)
        for step in range(params.max_tokens):
            raw, processed = process_logits(logits, step, params, eos)
            if greedy:
                tokens = processed.argmax(-1)  # (b,)
            else:
                probs = processed.exp()
                tokens = torch.stack(
                    [torch.multinomial(probs[r], 1, generator=generators[r])[0] for r in range(b)]
                )
            chosen = (processed if self.logprobs_mode == "processed" else raw).gather(-1, tokens[:, None])[:, 0]
            for r in range(b):
                if finish[r] is not None:
                    continue
                tok = int(tokens[r])
                responses[r].append(tok)
                logprobs[r].append(float(chosen[r]))
                finish[r], texts[r] = self._check_stop(responses[r], tok, params)
                if finish[r] is None and len(responses[r]) == budgets[r]:  # the context is full
                    finish[r], texts[r] = "length", self._decode_text(responses[r])
            if all(f is not None for f in finish):
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=-1)
            positions = positions[:, -1:] + 1  # (b, 1); a finished row's may pass the limit: clamped, unused
            positions = positions if limit is None else positions.clamp(max=limit - 1)
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
        samples = []
        for r, (i, _) in enumerate(rows):
            reason: FinishReason = finish[r] or "length"
            text = texts[r] if finish[r] is not None else self._decode_text(responses[r])
            samples.append(
                Sample(i, list(prompts[r]), responses[r], text, logprobs[r], reason, self.policy_version)
            )
        return samples

    def _generator(self, seed: int | None) -> torch.Generator:
        """A generator on the engine's device seeded `seed` (None: a random seed)."""
        g = torch.Generator(device=self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        return g

    def _check_stop(
        self, response: list[int], token: int, params: SamplingConfig
    ) -> tuple[FinishReason | None, str]:
        """(finish reason or None, text) after appending `token`; vLLM's EOS / stop-string / min_tokens rules."""
        n = len(response)
        if token in self.eos_ids:  # masked while n <= min_tokens, so only reachable after
            return "stop", self._decode_text(response)
        if n <= params.min_tokens or not params.stop:
            return None, ""
        text = str(self.tokenizer.decode(response, skip_special_tokens=True))
        # a match must end after the first min_tokens tokens' text (`boundary`), so it may start up to
        # len(s) - 1 characters before it; the earliest-ending match wins (ties: first in `stop`), as in vLLM
        boundary = len(str(self.tokenizer.decode(response[: params.min_tokens], skip_special_tokens=True)))
        starts = [text.find(s, max(0, boundary - len(s) + 1)) for s in params.stop]
        hits = [idx + len(s) for idx, s in zip(starts, params.stop, strict=True) if idx != -1]
        if hits:
            return "stop", text[: min(hits)]
        return None, text

    def _decode_text(self, response: list[int]) -> str:
        """Detokenised response; a trailing incomplete UTF-8 sequence is dropped, as vLLM's detokenizer does."""
        return str(self.tokenizer.decode(response, skip_special_tokens=True)).rstrip("\ufffd")

    def _check_prompt(self, index: int, ids: list[int]) -> None:
        """ValueError for a prompt vLLM would refuse too: empty, a token id outside the model's vocabulary, or
        no room left for one response token within `max_model_len`."""
        embeddings: Any = self.model.get_input_embeddings  # a transformers model's (nn.Module types it a Tensor)
        vocab = int(embeddings().num_embeddings)
        limit = self.max_model_len
        if not ids:
            raise ValueError(f"HFEngine.generate: prompt {index} is empty (no tokens)")
        if not all(0 <= t < vocab for t in ids):
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise ValueError(f"HFEngine.generate: prompt {index} has token id {bad}, outside the vocabulary [0, {vocab})")
        if limit is not None and len(ids) >= limit:
            raise ValueError(
                f"HFEngine.generate: prompt {index} has {len(ids)} tokens, which leaves no room for a response "
                f"within the model's max_model_len={limit} (prompt + response tokens)"
            )

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):  # the tokenizer's default special tokens, as vLLM encodes text prompts
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    # ---- weights ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (name, tensor) pairs into the model in place, one tensor at a time, checked first.

        `rollout.weights.WeightCheck` (the vLLM engine's check): every name of the model once (tied weights are
        covered through any alias), each with the target's exact shape (``copy_`` would broadcast); dtype and
        device may differ. A name not in the model raises `KeyError`, any other problem `ValueError`.
        Streamed, not staged: the tensors before the first bad one are already copied, nothing after it is,
        and the rest of the stream is still read (a ZeRO-3 `WeightStream` gathers collectively). On an error
        `policy_version` stays; on success it advances (`rollout.weights.next_version`).
        """
        start, moved = time.perf_counter(), 0
        targets = dict(iter_state_dict(self.model))
        first_name: dict[int, str] = {}  # tied weights: every alias of one storage maps to its first name
        aliases = {name: first_name.setdefault(t.data_ptr(), name) for name, t in targets.items()}
        check = WeightCheck({n: tuple(t.shape) for n, t in targets.items()}, what="model", aliases=aliases)
        for name, tensor in check.stream(weights):
            target = targets[name]
            if target.data_ptr() != tensor.data_ptr():
                target.copy_(tensor)
            moved += tensor.numel() * tensor.element_size()
        check.drain()
        problem = check.problem()
        if problem is not None:
            message = f"HFEngine.update_weights: {problem}{_PARTIAL}"
            raise KeyError(message) if check.unknown else ValueError(message)
        self._policy_version = next_version(weights, self._policy_version)
        self.metrics.update(sync_metrics(time.perf_counter() - start, moved))

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence."""
        return score_sequences(self.model, token_ids)

    @torch.no_grad()
    def score(
        self, prompt_ids: Sequence[int], response_ids: Sequence[int], params: SamplingConfig
    ) -> list[float]:
        """Teacher-forced `Sample.logprobs` of a given response: what generating it here would have reported."""
        ids = torch.tensor([[*prompt_ids, *response_ids]], device=self.device)  # (1, s)
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # (r, vocab)
        eos = torch.tensor(self.eos_ids, device=self.device)
        out = []
        for step, token in enumerate(response_ids):
            raw, processed = process_logits(logits[step : step + 1], step, params, eos)
            out.append(float((processed if self.logprobs_mode == "processed" else raw)[0, token]))
        return out

    # ---- memory -------------------------------------------------------------------------------------------
    @property
    def sleep_supported(self) -> bool:
        """Sleep offloads an owned model to CPU; a shared (learner's) module or a CPU engine never moves."""
        return self._owns_model and self.device.type != "cpu"

    def sleep(self) -> None:
        if self.sleep_supported and not self._sleeping:
            self.model.to("cpu")
            torch.cuda.empty_cache()
            self._sleeping = True

    def wake(self) -> None:
        if self._sleeping:
            self.model.to(self.device)
            self._sleeping = False

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """EOS ids from the generation config (vLLM reads it too) and the tokenizer, deduplicated."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("HFEngine: neither the generation config nor the tokenizer defines an EOS token")
    return ids
