"""The one per-token log-prob path of the learner: padded or packed micro-batches, without a second vocab copy.

Log-probs: the naive ``torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])`` allocates a
float32 ``(batch, seq, vocab)`` tensor next to the logits (≈ 4.6 GiB for 8 × 1024 tokens at a 150k
vocabulary), and autograd keeps it until backward. Here ``log p(y_t) = z_t[y_t] − logsumexp(z_t)`` is taken
chunk by chunk inside an autograd function (`_ChunkLogProbs`) that saves only the logits and recomputes the
chunk's softmax in backward with ``∂ log p(y)/∂z = onehot(y) − p`` and ``∂H/∂z = −p ⊙ (log p + H)``.

Layouts (`forward_log_probs`): a micro-batch is trimmed to its longest real row, or packed into one row with
position ids restarting per sequence and no attention mask (HF then attends within each sequence: a block
mask under ``sdpa``/``eager``, variable-length kernels under ``flash_attention_2/3``, where packing pays).
`length_sorted_order` groups rows of similar length; every aggregation of `trainer.losses` sums over rows,
so the gradient does not depend on which rows share a micro-batch. Sequence log-probs (DPO, IPO:
`sequence_log_probs`, `sequence_logp` of whole texts, float64 sums) are masked sums of the same path.

Naive twins: the one-line log-softmax above and the padded forward for every layout (tests: test_logprobs,
test_packing).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer.data.batching import TokenBatch
from trainer.data.prompts import ALPACA
from trainer.data.tokenization import pad_token_id_of

DEFAULT_CHUNK_TOKENS = 1024


def chunked_label_log_probs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    return_token_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(logits)[label]`` per position, computed ``chunk_tokens`` flattened tokens at a time.

    Equals the naive ``torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)``
    (tested to 1e-6), and the entropy equals the max-shifted ``−Σ_v p_v log p_v``, values and gradients; but only one
    chunk of ``(chunk_tokens, vocab)`` float32 is ever alive besides the logits themselves, and autograd
    saves nothing but the logits (tested with saved-tensor hooks).

    Args:
        logits: (batch, seq, vocab), any float dtype.
        labels: (batch, seq) long.
        compute_dtype: dtype each chunk is upcast to and the results are in; default float32 (float64
            for float64 logits). Pass float64 where many log-probs are summed and then differenced (DPO):
            fp32 rounding of a ~500-token sum is ~1e-5 absolute. Chunk memory is
            ``chunk_tokens · vocab · itemsize``.
    Returns:
        (log_probs (batch, seq), token_entropy (batch, seq) or None), both in ``compute_dtype``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1; got {chunk_tokens}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    if compute_dtype is not None:
        out_dtype = compute_dtype
    else:
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (batch*seq, vocab), a view when contiguous
    flat_labels = labels.reshape(-1)  # (batch*seq,)
    log_prob_chunks: list[torch.Tensor] = []
    entropy_chunks: list[torch.Tensor] = []
    # torch.split (one SplitBackward) rather than slicing, so backward assembles the logits gradient once
    # instead of allocating a full-size zero tensor per chunk.
    for logit_chunk, y in zip(
        torch.split(flat_logits, chunk_tokens), torch.split(flat_labels, chunk_tokens), strict=True
    ):
        log_prob, entropy = _chunk_log_probs(logit_chunk, y, out_dtype, return_token_entropy)
        log_prob_chunks.append(log_prob)
        entropy_chunks.append(entropy)
    log_probs = torch.cat(log_prob_chunks).view(labels.shape)  # (batch, seq)
    entropy = torch.cat(entropy_chunks).view(labels.shape) if return_token_entropy else None
    return log_probs, entropy


def _chunk_log_softmax(logit_chunk: torch.Tensor, dtype: torch.dtype,
                       stats: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(log-softmax (chunk, vocab) in `dtype`, its row statistics (max, logsumexp), each (chunk, 1)).

    ``log p = (z − max) − logsumexp(z − max)``: the max is not added back, which would round to float32
    spacing at large logits. Given `stats` (from the forward pass) the logsumexp is not recomputed.
    """
    z = logit_chunk.to(dtype)  # (chunk, vocab): the only full-vocabulary copy
    if stats is None:
        top = z.amax(dim=-1, keepdim=True)
        stats = (top, torch.logsumexp(z - top, dim=-1, keepdim=True))
    top, lse = stats
    return z.sub_(top).sub_(lse) if z is not logit_chunk else z - top - lse, stats


def _entropy_from_log_p(log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, log p clamped finite, H) of a log-softmax: ``−inf`` becomes the most negative finite value, so its
    ``p · log p`` is 0, not ``0 · (−inf)``."""
    finite = log_p.clamp(min=torch.finfo(log_p.dtype).min)
    p = finite.exp()
    return p, finite, -(p * finite).sum(dim=-1)


class _ChunkLogProbs(torch.autograd.Function):
    """Label log-probs (and entropies) of one chunk; saves only the logits chunk, recomputes in backward."""

    @staticmethod
    def forward(ctx: Any, logit_chunk: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        log_p, stats = _chunk_log_softmax(logit_chunk, dtype)  # (chunk, vocab), 2 × (chunk, 1)
        log_prob = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (chunk,)
        entropy = _entropy_from_log_p(log_p)[2] if with_entropy else log_prob.new_zeros(0)
        ctx.save_for_backward(logit_chunk, labels, *stats)
        ctx.dtype = dtype
        ctx.set_materialize_grads(False)  # an output the loss does not use (the entropy metric) gets None
        return log_prob, entropy

    @staticmethod
    def backward(ctx: Any, grad_log_prob: torch.Tensor | None, grad_entropy: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, None, None, None]:
        logit_chunk, labels, top, lse = ctx.saved_tensors
        if grad_log_prob is None and grad_entropy is None:
            return None, None, None, None
        g_lp = grad_log_prob if grad_log_prob is not None else top.new_zeros(labels.shape)  # (chunk,)
        log_p, _ = _chunk_log_softmax(logit_chunk, ctx.dtype, (top, lse))
        if grad_entropy is not None:  # ∂H/∂z = −p ⊙ (log p + H), plus the log-prob term below
            p, finite_log_p, entropy = _entropy_from_log_p(log_p)
            grad = -p * (grad_entropy.unsqueeze(-1) * (finite_log_p + entropy.unsqueeze(-1)) + g_lp.unsqueeze(-1))
        else:
            grad = log_p.exp_().mul_(-g_lp.unsqueeze(-1))  # in place: log_p is not needed again
        grad.scatter_add_(-1, labels.unsqueeze(-1), g_lp.unsqueeze(-1))  # ∂ log p(y)/∂z = onehot(y) − p
        return grad.to(logit_chunk.dtype), None, None, None


def get_response_log_probs(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool = False,
    *,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """``log p_θ(labels_t | input_ids_{≤t})`` for every position of a causal LM.

    Equals the naive ``torch.log_softmax(model(input_ids).logits.float(), -1).gather(-1, labels[..., None])``
    (tested within 1e-5), computed chunk by chunk (`chunked_label_log_probs`) without a float32 copy of
    the full ``(batch, seq, vocab)`` logits.

    Args:
        model: a HF causal LM (anything whose call returns ``.logits`` (batch, seq, vocab)).
        input_ids: (batch, seq) long.
        labels: (batch, seq) long (``input_ids`` shifted left by one).
        return_token_entropy: also return the per-position entropy ``H = −Σ_v p_v log p_v``.
        attention_mask: optional (batch, seq) mask passed to the model (1 = real token).
        temperature: score under softmax(logits / temperature), the distribution a sampler at that
            temperature draws from (entropies too); 1 = the model's own.
        compute_dtype: as in `chunked_label_log_probs` (default float32).
    Returns:
        ``{"log_probs": (batch, seq)}`` plus ``"token_entropy": (batch, seq)`` when asked, in `compute_dtype`.
    """
    if attention_mask is None:
        logits = model(input_ids=input_ids).logits  # (batch, seq, vocab)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = scale_logits(logits, temperature)
    log_probs, entropy = chunked_label_log_probs(
        logits, labels, return_token_entropy=return_token_entropy, chunk_tokens=chunk_tokens,
        compute_dtype=compute_dtype,
    )
    return _as_dict(log_probs, entropy)


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, in place (the lm_head's backward does not need its output, and a copy
    would cost another (batch, seq, vocab) tensor); unchanged at temperature 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature}")
    return logits if temperature == 1.0 else logits.div_(temperature)


def sequence_log_probs(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed log-probability of the masked labels of each sequence: ``Σ_t m_t log p_θ(y_t | x_{≤t})``.

    Args: as `get_response_log_probs`, plus ``response_mask`` (batch, seq) bool or 0/1.
    Returns: (batch,) in `compute_dtype` (default float32).
    """
    log_probs = get_response_log_probs(
        model, input_ids, labels, attention_mask=attention_mask, chunk_tokens=chunk_tokens,
        compute_dtype=compute_dtype,
    )["log_probs"]  # (batch, seq)
    return (log_probs * response_mask.to(log_probs.dtype)).sum(dim=-1)  # (batch,)


def format_pair(prompt: str, response: str, template: str = ALPACA) -> str:
    """``template`` filled with ``instruction=prompt, response=response`` (no EOS; see `sequence_logp`)."""
    return template.format(instruction=prompt, response=response)


def sequence_logp(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    append_eos: bool = True,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Summed log-probability of each text under `model`: ``Σ_{t≥1} log p(x_t | x_<t)`` (DPO, IPO).

    Each text is tokenised without special tokens, the EOS id is appended (`append_eos`), the batch is
    right-padded and scored by `sequence_log_probs` in one forward pass on the model's device; padding is
    masked out. The first token has no context and is not scored (the same prompt prefix starts every
    DPO sequence). The sums run in `compute_dtype`, float64 by default: DPO differences four sums of
    hundreds of log-probs (each ~−500), and float32 rounding of those sums (~1e-5 absolute) would show up
    as a ~1e-5 relative error in the loss. Extra memory: one ``chunk_tokens × vocab`` float64 chunk.

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
    full = torch.full((len(ids), width), pad_token_id_of(tokenizer), dtype=torch.long)  # (batch, T)
    attention = torch.zeros((len(ids), width), dtype=torch.long)  # (batch, T)
    for i, seq in enumerate(ids):
        full[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
    device: torch.device = next(model.parameters()).device
    full, attention = full.to(device), attention.to(device)
    return sequence_log_probs(
        model, full[:, :-1], full[:, 1:], attention[:, 1:], attention_mask=attention[:, :-1],
        chunk_tokens=chunk_tokens, compute_dtype=compute_dtype,
    )  # (batch,)


# ---- micro-batch layouts -----------------------------------------------------------------------------
def real_lengths(tokens: TokenBatch) -> torch.Tensor:
    """Real (non-pad) input positions of each row; (batch,) long."""
    return tokens.attention_mask.sum(dim=-1)


def trim(tokens: TokenBatch) -> TokenBatch:
    """The same rows with the columns after the longest real sequence removed (right padding only)."""
    width = int(real_lengths(tokens).max()) if len(tokens) else 0
    return tokens.select_columns(slice(0, max(width, 1)))


def length_sorted_order(tokens: TokenBatch, rows: torch.Tensor) -> torch.Tensor:
    """`rows` (indices into `tokens`) ordered by real length, longest first (stable, so deterministic)."""
    lengths = real_lengths(tokens)[rows]  # (n,)
    return rows[torch.sort(lengths, descending=True, stable=True).indices]


@dataclass
class PackedRow:
    """The real tokens of a right-padded micro-batch laid end to end; tensors are (1, total_tokens)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    source_rows: torch.Tensor  # (total_tokens,) row of the padded batch each packed token came from
    source_cols: torch.Tensor  # (total_tokens,) its column there
    padded_shape: tuple[int, int]

    def response_positions(self, tokens: TokenBatch) -> torch.Tensor:
        """Indices into the packed row of the response labels of `tokens` (the batch this row packs)."""
        return tokens.response_mask.bool()[self.source_rows, self.source_cols].nonzero().squeeze(-1)

    def spread(self, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(1, len(positions)) values at those packed positions back onto the whole row, 0 elsewhere."""
        return values.new_zeros(1, len(self.source_rows)).index_copy(1, positions, values)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """(1, total_tokens) per-token values back to the padded (batch, seq) layout, 0 on padding."""
        out = values.new_zeros(self.padded_shape)
        out[self.source_rows, self.source_cols] = values[0]
        return out


def pack(tokens: TokenBatch) -> PackedRow:
    """Lay the real positions of each (right-padded) row end to end; positions restart at 0 per row."""
    real = tokens.attention_mask.bool()  # (batch, seq)
    rows, cols = real.nonzero(as_tuple=True)  # row-major: each row's tokens in order
    return PackedRow(
        input_ids=tokens.input_ids[rows, cols].unsqueeze(0),
        position_ids=cols.unsqueeze(0),  # right padding: the column is the position within the sequence
        labels=tokens.labels[rows, cols].unsqueeze(0),
        source_rows=rows,
        source_cols=cols,
        padded_shape=(int(real.shape[0]), int(real.shape[1])),
    )


def forward_log_probs(
    model: torch.nn.Module, tokens: TokenBatch, *, return_token_entropy: bool = False, packed: bool = False,
    temperature: float = 1.0, response_only: bool = False,
) -> dict[str, torch.Tensor]:
    """`get_response_log_probs` of a micro-batch in the trimmed (or packed) layout, returned padded.

    Returns ``{"log_probs": (batch, seq)}`` (+ ``"token_entropy"``) in `tokens`' own width, equal to the
    padded twin on real positions and exactly 0 on padding in every layout (so log-prob ratios between
    layouts are 1 there, never ``exp`` of a padding value). `temperature`: as in `get_response_log_probs`.
    `response_only`: only positions in ``tokens.response_mask`` are scored (0 elsewhere); the LM head and
    the softmax then run on the response columns alone (HF ``logits_to_keep``), not on the prompt.
    """
    width = tokens.input_ids.shape[1]
    keep_logits = response_only and accepts_logits_to_keep(model)
    if packed:
        out = _packed(model, tokens, return_token_entropy, temperature, keep_logits)
    else:
        short = trim(tokens)
        first = first_response_column(short) if keep_logits else 0
        if first:
            out = _response_columns(model, short, first, return_token_entropy, temperature)
        else:
            out = get_response_log_probs(model, short.input_ids, short.labels, return_token_entropy,
                                         attention_mask=short.attention_mask, temperature=temperature)
        out = {k: _pad_columns(torch.where(short.attention_mask.bool(), v, 0.0), width) for k, v in out.items()}
    if response_only:
        out = {k: torch.where(tokens.response_mask.bool(), v, 0.0) for k, v in out.items()}
    return out


def _packed(model: torch.nn.Module, tokens: TokenBatch, return_token_entropy: bool, temperature: float,
            keep_logits: bool) -> dict[str, torch.Tensor]:
    """The packed layout (one row, positions restarting per sequence), unpacked; with `keep_logits` the LM
    head runs on the response positions alone."""
    row = pack(tokens)
    kept = row.response_positions(tokens) if keep_logits else None
    if kept is not None and len(kept) == 0:
        kept = None
    # use_cache=False: HF detects packing from position_ids only when there is no KV cache
    extra = {} if kept is None else {"logits_to_keep": kept}
    logits = model(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False, **extra).logits
    labels = row.labels if kept is None else row.labels[:, kept]
    log_probs, entropy = chunked_label_log_probs(scale_logits(logits, temperature), labels,
                                                 return_token_entropy=return_token_entropy)
    out = _as_dict(log_probs, entropy)
    return {k: row.unpack(v if kept is None else row.spread(v, kept)) for k, v in out.items()}


def _response_columns(model: torch.nn.Module, short: TokenBatch, first: int, return_token_entropy: bool,
                      temperature: float) -> dict[str, torch.Tensor]:
    """Log-probs (and entropies) of columns ``first:`` only (the LM head runs there alone); 0 before."""
    logits = model(input_ids=short.input_ids, attention_mask=short.attention_mask,
                   logits_to_keep=short.input_ids.shape[1] - first).logits  # (batch, w - first, vocab)
    log_probs, entropy = chunked_label_log_probs(scale_logits(logits, temperature), short.labels[:, first:],
                                                 return_token_entropy=return_token_entropy)
    out = _as_dict(log_probs, entropy)
    return {k: torch.nn.functional.pad(v, (first, 0)) for k, v in out.items()}


def first_response_column(tokens: TokenBatch) -> int:
    """The first column holding a response label in any row (0 when there is none: score everything)."""
    columns = tokens.response_mask.bool().any(dim=0).nonzero()
    return int(columns[0]) if len(columns) else 0


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (possibly wrapped: DDP, DeepSpeed, peft) model's forward takes HF's ``logits_to_keep``."""
    inner: Any = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _as_dict(log_probs: torch.Tensor, entropy: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"log_probs": log_probs} if entropy is None else {"log_probs": log_probs, "token_entropy": entropy}


def _pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, w) -> (batch, width) with zeros on the right."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


_chunk_log_probs: Any = _ChunkLogProbs.apply  # (logit_chunk, labels, dtype, with_entropy) -> (log_prob, entropy)
