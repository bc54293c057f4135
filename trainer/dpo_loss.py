"""Direct Preference Optimisation loss (Rafailov et al. 2023, eq. 7; CS336 assignment 5 supplement).

    L_DPO = −log σ( β [ (log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x)) ] )

Each (prompt, response) is formatted with the Alpaca template (instruction = prompt), the EOS token is
appended, and the log-probability of the *whole* sequence is summed: the prompt's tokens appear in both
the chosen and the rejected sequence, so their log-probs cancel in the difference of differences.
Forgetting the template or the EOS is the classic bug; ``tests/test_dpo_loss.py`` checks that each
changes the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from trainer.data.prompts import ALPACA
from trainer.data.tokenization import pad_token_id_of
from trainer.logprobs import DEFAULT_CHUNK_TOKENS, chunked_label_log_probs
from trainer.masking import aggregate_loss


def format_pair(prompt: str, response: str, template: str = ALPACA) -> str:
    """``template`` filled with ``instruction=prompt, response=response`` (no EOS; see `sequence_logp`)."""
    return template.format(instruction=prompt, response=response)


def _model_device(model: Any) -> torch.device:
    device: torch.device = next(model.parameters()).device
    return device


def sequence_logp(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    append_eos: bool = True,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Summed log-probability of each text under `model`: ``Σ_{t≥1} log p(x_t | x_<t)``.

    Each text is tokenised without special tokens, the EOS id is appended (`append_eos`), the batch is
    right-padded and run in one forward pass on the model's device; padded positions are masked out.
    The first token has no context and is not scored (the same prompt prefix starts every DPO sequence).

    The log-softmax and the sum run in `compute_dtype`, float64 by default: DPO differences four sums of
    hundreds of log-probs (each ~−500), and float32 rounding of those sums (~1e-5 absolute) would show
    up as a ~1e-5 relative error in the loss. Extra memory: one ``chunk_tokens × vocab`` float64 chunk.

    Returns: (len(texts),) in `compute_dtype` on the model's device, differentiable w.r.t. the model.
    """
    if not texts:
        raise ValueError("sequence_logp needs at least one text")
    if append_eos and tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token to append")
    ids: list[list[int]] = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if append_eos:
        ids = [[*seq, int(tokenizer.eos_token_id)] for seq in ids]
    if min(len(seq) for seq in ids) < 2:
        raise ValueError("every text must tokenise to at least 2 tokens (with EOS) to be scored")
    width = max(len(seq) for seq in ids)
    device = _model_device(model)
    full = torch.full((len(ids), width), pad_token_id_of(tokenizer), dtype=torch.long)  # (batch, T)
    attention = torch.zeros((len(ids), width), dtype=torch.long)  # (batch, T)
    for i, seq in enumerate(ids):
        full[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
    full, attention = full.to(device), attention.to(device)
    logits = model(input_ids=full[:, :-1], attention_mask=attention[:, :-1]).logits  # (batch, T-1, vocab)
    log_probs, _ = chunked_label_log_probs(
        logits, full[:, 1:], chunk_tokens=chunk_tokens, compute_dtype=compute_dtype
    )  # (batch, T-1)
    return (log_probs * attention[:, 1:].to(log_probs.dtype)).sum(dim=-1)  # (batch,)


def dpo_loss_from_logps(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair DPO loss ``−log σ(β[(π_w − ref_w) − (π_l − ref_l)])`` from sequence log-probs (eq. 7).

    All inputs (batch,) summed sequence log-probs; the reference ones are treated as constants.
    Returns (batch,) — reduce with `dpo_batch_loss` (or `aggregate_loss`).
    """
    margin = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())  # (batch,)
    return -F.logsigmoid(beta * margin)  # (batch,)


def dpo_batch_loss(per_pair_loss: torch.Tensor, gradient_accumulation_steps: int = 1) -> torch.Tensor:
    """Mean over pairs of the per-pair loss, / grad-accum, via the shared `aggregate_loss` rule.

    A pair is a one-token "sequence" here, so mode ``"sequence_mean"`` is exactly
    ``per_pair_loss.mean() / gradient_accumulation_steps``.
    """
    # per_pair_loss: (batch,) -> (batch, 1)
    per_pair = per_pair_loss.unsqueeze(-1)
    return aggregate_loss(
        per_pair,
        torch.ones_like(per_pair, dtype=torch.bool),
        "sequence_mean",
        gradient_accumulation_steps=gradient_accumulation_steps,
    )


def batched_dpo_loss(
    lm: Any,
    lm_ref: Any,
    tokenizer: Any,
    beta: float,
    prompts: Sequence[str],
    responses_chosen: Sequence[str],
    responses_rejected: Sequence[str],
    template: str = ALPACA,
) -> torch.Tensor:
    """Per-pair DPO losses (batch,) for many pairs; chosen and rejected run in one forward per model.

    The reference model runs under ``no_grad`` on its own device and its log-probs are moved to `lm`'s
    device, so the result (and its graph) lives on `lm`'s device.
    """
    if not len(prompts) == len(responses_chosen) == len(responses_rejected):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(responses_chosen)} chosen and "
            f"{len(responses_rejected)} rejected responses"
        )
    n = len(prompts)
    texts = [format_pair(p, r, template) for p, r in zip(prompts, responses_chosen, strict=True)]
    texts += [format_pair(p, r, template) for p, r in zip(prompts, responses_rejected, strict=True)]
    policy = sequence_logp(lm, tokenizer, texts)  # (2n,)
    with torch.no_grad():
        ref = sequence_logp(lm_ref, tokenizer, texts).to(policy.device)  # (2n,)
    return dpo_loss_from_logps(policy[:n], policy[n:], ref[:n], ref[n:], beta)  # (n,)


def compute_per_instance_dpo_loss(
    lm: Any,
    lm_ref: Any,
    tokenizer: Any,
    beta: float,
    prompt: str,
    response_chosen: str,
    response_rejected: str,
    template: str = ALPACA,
) -> torch.Tensor:
    """DPO loss (0-dim, on `lm`'s device) of one preference pair (module docstring, eq. 7).

    Both responses are formatted with `template` (``instruction=prompt``), EOS appended; sequence
    log-probs are summed over the whole sequence under `lm` and (no_grad) `lm_ref`.
    """
    return batched_dpo_loss(
        lm, lm_ref, tokenizer, beta, [prompt], [response_chosen], [response_rejected], template
    )[0]
