"""Supervised fine-tuning learner (``mode: sft``): reasoning SFT (CS336 assignment 5 §4) and packed
instruction tuning (assignment 5 supplement). It also provides the SFT step that expert iteration reuses.

Exactly this:

1. Data.
   - Reasoning SFT (``sft.packed: false``): JSONL ``{"prompt", "response"}`` at ``data.sft_path``, with an
     optional gold ``"answer"``, ``"gold"`` or ``"ground_truth"`` (CS336's file). The prompt is already
     formatted (e.g. ``r1_zero``), the response is reasoning + answer; nothing (no EOS) is appended. A
     seeded ``sft.validation_fraction`` of the lines is held out first; then, on the training part only,
     ``sft.filter_correct`` keeps the examples whose response the reward function (``reward.fn``) grades
     correct against the gold, and ``sft.max_examples`` keeps a seeded random subset of that many unique
     examples. Each (prompt, response) is tokenised as by `tokenize_prompt_and_output`; the loss covers
     response tokens only.
   - Packed instruction tuning (``sft.packed: true``): `PackedSFTDataset` (Alpaca template, BOS when the
     tokenizer adds one, EOS after each document, ``sft.seq_length`` blocks, every token a target);
     batches come from `iterate_batches`. The last ``validation_fraction`` of the blocks is held out (a
     document may straddle the boundary); ``max_examples`` caps the number of training blocks.
2. Optimizer batches of ``sft.batch_size`` examples (a fresh seeded shuffle each epoch; the last batch of
   an epoch may be short), each split into ``sft.gradient_accumulation_steps`` micro-batches.
3. Loss: per-token NLL averaged over every response token of the optimizer batch (all micro-batches and
   ranks), i.e. `trainer.masking.aggregate_loss` in ``"token"`` mode — the computation of
   ``sft_microbatch_train_step(..., length_normalization="token")``, backpropagated through the
   Accelerator (`Learner.backward`) so that DeepSpeed launches work. Token-level normalisation makes the
   gradient independent of how the batch is cut into micro-batches, so short micro-batches are allowed.
4. Gradient-norm clip (``optim.max_grad_norm``, 1.0), then the configured optimizer (AdamW by default) and
   learning-rate schedule (`Learner.step`).
5. Before training, every ``eval.every`` steps and at the end: held-out loss (token-mean NLL,
   ``eval/loss``) and, with ``sft.eval_generation``, held-out generation accuracy through the shared
   evaluator (`Session.evaluate`, after syncing the weights into the rollout engine).

Length: ``sft.max_steps`` optimizer steps if set (cycling over epochs), else ``sft.num_epochs`` epochs.
Resume: the data order is a pure function of (seed, epoch), so a resumed run skips the batches it has seen
and continues with the restored optimizer state. Data parallel: each rank takes rows ``rank::world`` of
every optimizer batch (`trainer.data.batching.deal_micro_batches`), and a rank short of rows — the last short
batch of an epoch may hold fewer rows than ranks — pads with zero-weight micro-batches, so that every rank
runs the same forward/backward passes and optimizer steps; every batch trains, as on one process.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from trainer.config import RunConfig
from trainer.data.batching import TokenBatch, deal_micro_batches, pack_micro_batches, pack_token_ids
from trainer.data.jsonl import DatasetFormatError, read_jsonl
from trainer.data.sft import PackedSFTDataset, iterate_batches
from trainer.data.tokenization import pad_token_id_of
from trainer.learner import Learner, global_token_count
from trainer.logprobs import get_response_log_probs, real_lengths
from trainer.masking import aggregate_loss
from trainer.session import Session

T = TypeVar("T")


# ---- data ---------------------------------------------------------------------------------------
def read_jsonl_records(
    path: str | Path, required: Sequence[str], optional: Sequence[str] = (), field: str = "data file"
) -> list[tuple[int, dict[str, str]]]:
    """(line number, record) of every non-blank line; each record has the `required` string keys.

    Raises FileNotFoundError naming `field` for a missing file, and `DatasetFormatError` naming the file
    and 1-based line for invalid JSON, a non-object, a missing or non-string key, or a file with no records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r}: no such file")
    out: list[tuple[int, dict[str, str]]] = list(read_jsonl(path, required, optional=optional))
    if not out:
        raise DatasetFormatError(
            f"{path}: no records (empty file); expected JSONL lines with {list(required)}"
        )
    return out


GOLD_KEYS = (
    "answer",
    "gold",
    "ground_truth",
)  # optional gold field of an SFT line (CS336's sft.jsonl: ground_truth)


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    gold: str | None = None
    where: str = ""  # "file:line", for error messages


def read_sft_examples(path: str | Path) -> list[SFTExample]:
    """``{"prompt", "response"[, "answer" | "gold" | "ground_truth"]}`` lines of `path` (errors name file and
    line); the first gold key present is used. A numeric gold (``"answer": 5``) becomes its ``str`` ("5"),
    as CS336 converts numeric ground truth; any other non-string gold is a `DatasetFormatError`."""
    records = read_jsonl_records(path, ("prompt", "response"), (), "data.sft_path")
    return [
        SFTExample(r["prompt"], r["response"], _gold_of(r, f"{path}:{n}"), f"{path}:{n}") for n, r in records
    ]


def _gold_of(record: dict[str, Any], where: str) -> str | None:
    key = next((k for k in GOLD_KEYS if k in record), None)
    if key is None:
        return None
    gold = record[key]
    if isinstance(gold, str):
        return gold
    if isinstance(gold, int | float) and not isinstance(gold, bool):
        return str(gold)
    raise DatasetFormatError(f"{where}: {key!r} must be a string or a number, got {type(gold).__name__}")


def split_heldout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded ``round(fraction·n)`` held out (at least 1 if fraction > 0)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = 0 if fraction == 0 else min(n - 1, max(1, round(fraction * n)))
    return sorted(order[k:]), sorted(order[:k])


def filter_correct(s: Session, examples: list[SFTExample]) -> list[SFTExample]:
    """The examples whose response the reward function grades correct against their gold."""
    missing = [ex.where for ex in examples if ex.gold is None]
    if missing:
        raise DatasetFormatError(
            f"{missing[0]}: sft.filter_correct needs a gold {' / '.join(GOLD_KEYS)} field on every line "
            f"({len(missing)} line(s) lack one)"
        )
    scores = s.scorer.score([ex.response for ex in examples], [str(ex.gold) for ex in examples])
    return [ex for ex, sc in zip(examples, scores, strict=True) if sc["answer_reward"] > 0]


def epoch_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of each optimizer batch of one epoch: a seeded permutation cut in `batch_size` chunks."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def pair_batch(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]) -> TokenBatch:
    """`tokenize_prompt_and_output` as a `TokenBatch`: the same ids, labels and response mask (built by its
    token-id twin `pack_token_ids`), plus the attention mask of the real tokens, 0 on the right padding, so
    that `real_lengths` (throughput, MFU) and `model.packing` leave the padding out."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} outputs")
    if not prompts:
        raise ValueError("pair_batch needs at least one (prompt, output) pair")
    prompt_ids: list[list[int]] = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids: list[list[int]] = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    if max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)) < 2:
        raise ValueError("every (prompt, output) pair tokenises to fewer than 2 tokens; nothing to predict")
    return pack_token_ids(prompt_ids, response_ids, pad_token_id_of(tokenizer))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer batches in an epoch of `n` rows, a short last batch included (every rank runs it, with
    zero-weight stand-ins where it has no rows: `trainer.data.batching.deal_micro_batches`)."""
    return math.ceil(n / batch_size)


@dataclass
class SFTData:
    """Training data as, per epoch, optimizer batches of this rank's micro-batches; held-out micro-batches."""

    n_train: int
    steps_per_epoch: int
    epoch: Callable[[int], Iterator[list[TokenBatch]]]
    heldout: list[TokenBatch]

    def stream(self, start_step: int) -> Iterator[list[TokenBatch]]:
        """Micro-batches of every optimizer step after `start_step`, cycling over epochs."""
        return step_stream(self.epoch, self.steps_per_epoch, start_step)


def step_stream(epoch: Callable[[int], Iterator[T]], steps_per_epoch: int, start_step: int) -> Iterator[T]:
    """The items of epochs 0, 1, 2, … (``epoch(e)`` yields one item per optimizer step), after skipping the
    first `start_step` (resume: the order is a pure function of the epoch, so nothing else is saved)."""
    first, skip = divmod(start_step, steps_per_epoch)
    for e in itertools.count(first):
        yield from itertools.islice(epoch(e), skip if e == first else 0, None)


def load_sft_data(s: Session) -> SFTData:
    """Reasoning pairs or packed blocks as configured (module docstring, item 1)."""
    cfg, sft = s.cfg, s.cfg.sft
    if not cfg.data.sft_path:
        raise FileNotFoundError('mode \'sft\' needs data.sft_path (JSONL of {"prompt", "response"})')
    rank, world = s.accelerator.process_index, s.accelerator.num_processes
    gas, micro = sft.gradient_accumulation_steps, max(1, sft.batch_size // sft.gradient_accumulation_steps)
    examples = read_sft_examples(cfg.data.sft_path)
    if sft.packed:
        return _packed_data(s, micro)
    train_idx, held_idx = split_heldout(len(examples), sft.validation_fraction, cfg.seed)
    train, held = [examples[i] for i in train_idx], [examples[i] for i in held_idx]
    if sft.filter_correct:
        kept = filter_correct(s, train)
        s.tracker.log(
            {
                "data/sft_examples_before_filter": float(len(train)),
                "data/sft_examples_correct": float(len(kept)),
            },
            0,
        )
        train = kept
    if sft.max_examples is not None and len(train) > sft.max_examples:
        train = random.Random(cfg.seed + 1).sample(train, sft.max_examples)
    if not train:
        raise ValueError(f"{cfg.data.sft_path}: no training examples left after the held-out split / filter")
    tok = s.learner.tokenizer

    def batch_of(exs: Sequence[SFTExample]) -> TokenBatch:
        return pair_batch(tok, [ex.prompt for ex in exs], [ex.response for ex in exs])

    def epoch(e: int) -> Iterator[list[TokenBatch]]:
        for rows in epoch_batches(len(train), sft.batch_size, cfg.seed * 100_003 + e):
            micro_rows = deal_micro_batches(rows, gas, rank, world)
            yield pack_micro_batches(micro_rows, lambda m: batch_of([train[i] for i in m]))

    heldout = [batch_of(held[i : i + micro]) for i in range(0, len(held), micro)]
    return SFTData(len(train), steps_per_epoch(len(train), sft.batch_size), epoch, heldout)


def _packed_data(s: Session, micro: int) -> SFTData:
    cfg, sft = s.cfg, s.cfg.sft
    if sft.filter_correct:
        raise ValueError("sft.filter_correct needs graded reasoning pairs; set sft.packed: false")
    rank, world = s.accelerator.process_index, s.accelerator.num_processes
    dataset = PackedSFTDataset(
        s.learner.tokenizer, str(cfg.data.sft_path), sft.seq_length, shuffle=True, seed=cfg.seed
    )
    n_held = 0 if sft.validation_fraction == 0 else max(1, round(sft.validation_fraction * len(dataset)))
    train_set = Subset(dataset, range(len(dataset) - n_held)[: sft.max_examples])
    if len(train_set) == 0:
        raise ValueError(
            f"{cfg.data.sft_path}: too little text for one training block of "
            f"sft.seq_length={sft.seq_length} tokens plus the held-out blocks"
        )

    def blocks(batch: dict[str, torch.Tensor]) -> TokenBatch:
        ones = torch.ones_like(batch["input_ids"])  # (b, seq_length): every token is a target
        return TokenBatch(batch["input_ids"], batch["labels"], ones.bool(), ones)

    def rows_of(batch: dict[str, torch.Tensor], rows: list[int]) -> TokenBatch:
        return blocks({k: v[rows] for k, v in batch.items()})

    def epoch(e: int) -> Iterator[list[TokenBatch]]:
        for batch in iterate_batches(train_set, sft.batch_size, shuffle=True, seed=cfg.seed * 100_003 + e):
            micro_rows = deal_micro_batches(
                range(len(batch["input_ids"])), sft.gradient_accumulation_steps, rank, world
            )
            yield pack_micro_batches(micro_rows, functools.partial(rows_of, batch))

    held_set = Subset(dataset, range(len(dataset) - n_held, len(dataset)))
    heldout = [blocks(b) for b in iterate_batches(held_set, micro, shuffle=False)] if n_held else []
    return SFTData(len(train_set), steps_per_epoch(len(train_set), sft.batch_size), epoch, heldout)


# ---- the SFT step (shared with expert iteration) ------------------------------------------------
def sft_update(learner: Learner, micro_batches: Sequence[TokenBatch]) -> dict[str, float]:
    """One optimizer step of response-only SFT over this rank's micro-batches (module docstring, 3-4).

    Loss of a micro-batch: ``W · Σ_{i,t} m_it (−log π_θ(y_it)) / N`` with ``N`` the response tokens of the
    whole optimizer batch over all ranks (`aggregate_loss` ``"token"``); the micro-batch losses sum to the
    token-mean NLL of the optimizer batch. Returns ``train/loss`` (that mean on this rank's data),
    ``train/grad_norm`` (before clipping), ``train/lr``, ``train/response_tokens``.
    """
    world = learner.accelerator.num_processes
    tokens = global_token_count(learner, torch.stack([mb.response_mask.sum() for mb in micro_batches]).sum())
    loss_sum = 0.0
    for i, mb in enumerate(micro_batches):
        with learner.accumulate(is_last_micro_batch=i == len(micro_batches) - 1):
            log_probs = learner.log_probs(mb)["log_probs"]  # (b, s)
            loss = aggregate_loss(
                -log_probs, mb.response_mask.to(learner.device), "token", global_token_count=tokens, world_size=world
            )
            learner.backward(loss)
            loss_sum += float(loss.detach())
    return {
        "train/loss": loss_sum,
        "train/grad_norm": learner.step(),
        "train/lr": float(learner.scheduler.get_last_lr()[0]),
        "train/response_tokens": tokens,
    }


@torch.inference_mode()
def heldout_loss(model: torch.nn.Module, micro_batches: Sequence[TokenBatch], device: torch.device) -> float:
    """Token-mean NLL of the response tokens of `micro_batches`: ``Σ m·(−log p) / Σ m``."""
    total, count = 0.0, 0.0
    for mb in micro_batches:
        mb = mb.to(device)
        lp = get_response_log_probs(model, mb.input_ids, mb.labels, attention_mask=mb.attention_mask)[
            "log_probs"
        ]
        mask = mb.response_mask.to(lp.dtype)
        total += float(-(lp * mask).sum())
        count += float(mask.sum())
    return total / count if count else math.nan


def evaluate_sft(s: Session, data: SFTData, step: int) -> dict[str, float]:
    """Held-out loss and, with ``sft.eval_generation``, held-out generation metrics (module docstring, 5)."""
    metrics: dict[str, float] = {}
    if data.heldout:
        with s.timer("eval"):
            metrics["eval/loss"] = heldout_loss(s.learner.model, data.heldout, s.learner.device)
        s.tracker.log(metrics, step)
    if s.cfg.sft.eval_generation:
        s.sync_weights()
        metrics |= s.evaluate(step)
    return metrics


# ---- the loop -----------------------------------------------------------------------------------
def train_sft(cfg: RunConfig, resume: bool = False) -> dict[str, float]:
    """Run SFT as configured; returns the final held-out metrics (``eval/loss``, ``eval/accuracy`` …)."""
    with Session(cfg, resume) as s:
        data = load_sft_data(s)
        total = cfg.sft.max_steps or cfg.sft.num_epochs * data.steps_per_epoch
        start = int(s.trainer_state["step"])
        s.tracker.log({"data/sft_train_examples": float(data.n_train)}, start)
        final = evaluate_sft(s, data, 0) if start == 0 else {}
        bar = tqdm(
            range(start + 1, total + 1),
            desc="sft",
            disable=not s.progress_enabled,
            initial=start,
            total=total,
        )
        for step, micro_batches in zip(bar, data.stream(start), strict=False):
            with s.timer("train"):
                metrics = sft_update(s.learner, micro_batches)
            useful = [mb for mb in micro_batches if mb.response_mask.any()]  # not zero-weight stand-ins
            metrics |= s.learner_throughput([n for mb in useful for n in real_lengths(mb).tolist()])
            metrics["train/epoch"] = (step - 1) // data.steps_per_epoch
            if step % cfg.logging.every == 0:
                s.tracker.log(s.reduce_metrics(metrics | s.timer.pop()), step)
            s.show_progress(bar, "sft", step, total, {"loss": f"{metrics['train/loss']:.3f}"})
            last = step == total
            if last or (cfg.eval.every and step % cfg.eval.every == 0):
                final = evaluate_sft(s, data, step)
            s.maybe_save(step, last)
        return final
