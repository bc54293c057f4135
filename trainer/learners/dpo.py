"""Preference-optimisation learner (``mode: dpo``): DPO (Rafailov et al. 2023), optionally IPO or SimPO.

1. Data: ``data.preference_path`` pairs (`trainer.data.preference`); a seeded ``dpo.validation_fraction``
   is held out. Each (prompt, response) is formatted with ``dpo.template`` and EOS is appended; DPO and
   IPO sum the whole sequence's log-probs (the prompt cancels in the log-ratio difference).
2. Reference: a frozen copy of ``model.path`` on ``dpo.reference_device``, under the policy's autocast
   (`reference_autocast`); SimPO needs none.
3. Optimizer steps of ``dpo.pairs_per_step`` pairs (seeded shuffle per epoch) in micro-batches of at most
   ``dpo.micro_batch_pairs``. Per-pair loss, ``h = (log π_w − log ref_w) − (log π_l − log ref_l)``: dpo
   ``−log σ(β h)`` (eq. 7); ipo ``(h − 1/(2β))²`` (Azar et al. 2023, eq. 17); simpo ``−log σ(β/|y_w| log
   π(y_w|x) − β/|y_l| log π(y_l|x) − γ)`` (Meng et al. 2024, eq. 6). Mean over the optimizer batch's pairs
   (`aggregate_loss`, one "token" per pair); clip, then RMSprop (the paper) or AdamW.
4. Validation before training, every ``eval.every`` steps and at the end: loss, implicit-reward accuracy
   (ties count one half, so the untrained policy scores 0.5) and margin, each rank evaluating its share of
   the held-out micro-batches (`Validator`) and the means taken over all of them; the best model by
   accuracy (the first of equals) goes to ``RUN_DIR/best/`` with ``best.json``, decided on every rank from
   those global means. Resume restores the best-so-far too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import save_model_folder
from trainer.config import DPOConfig, RunConfig
from trainer.data.batching import deal_micro_batches, pack_token_ids
from trainer.data.checks import drop_identical_pairs
from trainer.data.preference import PreferencePair, read_preference_pairs
from trainer.data.prompts import get_template
from trainer.data.sampler import epoch_batches, split_heldout, step_stream, steps_per_epoch
from trainer.data.tokenization import pad_token_id_of
from trainer.learner import Learner, global_token_count, heldout_share, load_frozen_reference, sum_over_ranks
from trainer.learners.loop import Mode, StepResult, run
from trainer.logprobs import format_pair, get_response_log_probs, sequence_logp
from trainer.lora import save_hf
from trainer.losses import aggregate_loss, dpo_loss_from_logps, ipo_loss_from_logps, simpo_loss_from_logps
from trainer.session import Session


# ---- log-probs of pairs ---------------------------------------------------------------------------
def response_mean_logp(
    model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], template: str
) -> torch.Tensor:
    """``log π(y + EOS | x) / |y + EOS|`` per pair, response tokens only (SimPO); (batch,) float32.

    The prompt side is `template` filled with an empty response; prompt and response are tokenised apart.
    """
    if not template.endswith("{response}"):
        raise ValueError("dpo.loss=simpo needs a template that ends in {response} (e.g. alpaca)")
    prefix_ids = tokenizer([format_pair(p, "", template) for p in prompts], add_special_tokens=False)[
        "input_ids"
    ]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    batch = pack_token_ids(
        prefix_ids, [[*r, tokenizer.eos_token_id] for r in response_ids], pad_token_id_of(tokenizer)
    ).to(next(model.parameters()).device)
    lp = get_response_log_probs(model, batch.input_ids, batch.labels, attention_mask=batch.attention_mask)
    mask = batch.response_mask.to(lp["log_probs"].dtype)  # (batch, seq)
    return (lp["log_probs"] * mask).sum(-1) / mask.sum(-1)


def pair_logps(
    model: Any, tokenizer: Any, pairs: Sequence[PreferencePair], template: str, loss: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs (batch,) each: summed sequence log-probs, or response means for SimPO."""
    prompts = [p.prompt for p in pairs]
    if loss == "simpo":
        both = response_mean_logp(
            model, tokenizer, prompts * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], template
        )
    else:
        texts = [format_pair(p.prompt, p.chosen, template) for p in pairs]
        texts += [format_pair(p.prompt, p.rejected, template) for p in pairs]
        both = sequence_logp(model, tokenizer, texts)  # (2n,)
    return both[: len(pairs)], both[len(pairs) :]


@dataclass
class PairOutput:
    loss: torch.Tensor  # (n,) per-pair loss
    reward_chosen: torch.Tensor  # (n,) implicit rewards, detached
    reward_rejected: torch.Tensor  # (n,)


def preference_loss(
    policy: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor] | None, cfg: DPOConfig
) -> PairOutput:
    """Per-pair loss of ``cfg.loss`` and the implicit rewards (module docstring, items 3 and 4)."""
    (pw, pl), beta = policy, cfg.beta
    if cfg.loss == "simpo":
        return PairOutput(
            simpo_loss_from_logps(pw, pl, beta, cfg.simpo_gamma), beta * pw.detach(), beta * pl.detach()
        )
    if ref is None:
        raise ValueError(f"dpo.loss={cfg.loss} needs reference log-probs")
    rw, rl = ref[0].to(pw.device), ref[1].to(pw.device)
    fn = dpo_loss_from_logps if cfg.loss == "dpo" else ipo_loss_from_logps
    return PairOutput(fn(pw, pl, rw, rl, beta), beta * (pw - rw).detach(), beta * (pl - rl).detach())


PAIR_METRICS = ("loss", "accuracy", "reward_margin", "reward_chosen", "reward_rejected")  # means over pairs


def pair_sums(out: PairOutput) -> torch.Tensor:
    """(1 + len(PAIR_METRICS),) float64: the pair count, then each of `PAIR_METRICS` summed over the pairs."""
    margin = out.reward_chosen - out.reward_rejected
    accuracy = (margin > 0).double() + 0.5 * (margin == 0).double()  # ties count one half
    per_pair = (out.loss.detach(), accuracy, margin, out.reward_chosen, out.reward_rejected)
    return torch.stack([torch.tensor(float(len(margin)), dtype=torch.float64),
                        *(x.double().sum() for x in per_pair)])  # fmt: skip


def metrics_from_sums(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}/<metric>``: each sum of `pair_sums` divided by the pair count."""
    n, *totals = sums.tolist()
    return {f"{prefix}/{name}": total / n for name, total in zip(PAIR_METRICS, totals, strict=True)}


def reward_metrics(out: PairOutput, prefix: str) -> dict[str, float]:
    """Means over the pairs of `out`: loss, implicit-reward accuracy, margin and rewards."""
    return metrics_from_sums(pair_sums(out), prefix)


def global_reward_metrics(learner: Learner, outs: Sequence[PairOutput], prefix: str) -> dict[str, float]:
    """`reward_metrics` over every rank's pairs: exact means over all of them (the ranks' sums and pair counts
    are added up before dividing), the same on every rank; {} if no rank has a pair. Every rank must call it."""
    local = pair_sums(_cat(outs)) if outs else torch.zeros(1 + len(PAIR_METRICS), dtype=torch.float64)
    total = sum_over_ranks(learner, local)
    return metrics_from_sums(total, prefix) if total[0] > 0 else {}


# ---- update and validation ------------------------------------------------------------------------
def dpo_update(
    learner: Learner,
    ref_model: torch.nn.Module | None,
    cfg: RunConfig,
    micro_batches: Sequence[Sequence[PreferencePair]],
    dummies: Sequence[bool] | None = None,
) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches: mean per-pair loss over the global batch.

    ``dummies[i]`` marks a zero-weight micro-batch (`trainer.data.batching.deal_micro_batches`): it runs its
    forward and backward, so every rank makes the same passes, but adds nothing to loss, gradient, pair
    count or metrics. The ``train/<PAIR_METRICS>`` are exact means over the real pairs of all ranks
    (`global_reward_metrics`), equal on every rank: global already for `Session.reduce_metrics`."""
    template, world = get_template(cfg.dpo.template), learner.accelerator.num_processes
    dummies = list(dummies) if dummies is not None else [False] * len(micro_batches)
    real_pairs = sum(len(mb) for mb, dummy in zip(micro_batches, dummies, strict=True) if not dummy)
    n_pairs = global_token_count(learner, torch.tensor(float(real_pairs)))
    outs = []
    for i, (pairs, dummy) in enumerate(zip(micro_batches, dummies, strict=True)):
        with learner.accumulate(is_last_micro_batch=i == len(micro_batches) - 1):
            policy = pair_logps(learner.model, learner.tokenizer, pairs, template, cfg.dpo.loss)
            ref = _ref_logps(ref_model, learner, pairs, template, cfg.dpo.loss)
            out = preference_loss(policy, ref, cfg.dpo)
            per_pair = out.loss.unsqueeze(-1)  # (n, 1): one "token" per pair
            weight = torch.full_like(per_pair, not dummy, dtype=torch.bool)
            learner.backward(aggregate_loss(per_pair, weight, "token", global_token_count=n_pairs, world_size=world))
            if not dummy:
                outs.append(out)
    metrics = global_reward_metrics(learner, outs, "train")
    metrics["train/grad_norm"] = learner.step()
    metrics["train/lr"] = float(learner.scheduler.get_last_lr()[0])
    return metrics


@torch.no_grad()
def _ref_logps(
    ref_model: torch.nn.Module | None,
    learner: Learner,
    pairs: Sequence[PreferencePair],
    template: str,
    loss: str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Reference (chosen, rejected) log-probs; `reference_model`'s forward runs under the policy's autocast.

    Inside autocast the logits come out in bf16 where the prepared policy's come out converted to
    float32; `sequence_logp` upcasts either to float64 before the log-softmax, so both give the same sums.
    """
    if ref_model is None:
        return None
    return pair_logps(ref_model, learner.tokenizer, pairs, template, loss)


def _cat(outs: Sequence[PairOutput]) -> PairOutput:
    return PairOutput(
        *(
            torch.cat([getattr(o, k).detach().float().cpu() for o in outs])
            for k in ("loss", "reward_chosen", "reward_rejected")
        )
    )


class Validator:
    """Held-out loss / accuracy, exact means over all held-out pairs (`global_reward_metrics`), the same on
    every rank. Each rank evaluates only its share of the held-out micro-batches (`heldout_share`: batches
    ``rank::world``, and stand-in forwards so that every rank runs as many); the reference log-probs of that
    share are computed once. One process evaluates every batch in order, as before the sharding."""

    def __init__(self, pairs: list[PreferencePair], micro: int) -> None:
        self.batches = [pairs[i : i + micro] for i in range(0, len(pairs), micro)]
        self._share: list[tuple[int, bool]] | None = None
        self._ref: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}

    @torch.inference_mode()
    def __call__(
        self, learner: Learner, ref_model: torch.nn.Module | None, cfg: DPOConfig
    ) -> dict[str, float]:
        template = get_template(cfg.template)
        if self._share is None:
            self._share = heldout_share(learner, len(self.batches))
            self._ref = {i: _ref_logps(ref_model, learner, self.batches[i], template, cfg.loss)
                         for i, stand_in in self._share if not stand_in}  # fmt: skip
        outs = []
        for i, stand_in in self._share:
            policy = pair_logps(learner.model, learner.tokenizer, self.batches[i], template, cfg.loss)
            if not stand_in:
                outs.append(preference_loss(policy, self._ref[i], cfg))
        return global_reward_metrics(learner, outs, "eval")


class BestModel:
    """The best validation accuracy so far (restored on resume); its model is in ``RUN_DIR/best/``."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.accuracy = float(s.trainer_state.get("best_accuracy", -math.inf))
        self.step = float(s.trainer_state.get("best_step", -1))

    def update(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Save the model if `metrics` beat the best so far (the first of equals stays); ``eval/best_*``."""
        if metrics["eval/accuracy"] > self.accuracy:
            self.accuracy, self.step = metrics["eval/accuracy"], float(step)
            self.save(step, metrics)
        return {"eval/best_accuracy": self.accuracy, "eval/best_step": self.step}

    def state(self) -> dict[str, float]:
        return {"best_accuracy": self.accuracy, "best_step": self.step}

    def save(self, step: int, metrics: dict[str, float]) -> None:
        """Write the model to ``RUN_DIR/best/`` (atomically: ``best.tmp`` then rename) + ``best.json``."""
        s = self.s
        state_dict = s.accelerator.get_state_dict(s.learner.model)

        def write(folder: Path) -> None:
            save_hf(s.learner.unwrapped, folder, state_dict)  # under model.lora: the merged model
            s.learner.tokenizer.save_pretrained(folder)
            (folder / "best.json").write_text(json.dumps({"step": step, **metrics}, indent=2))

        save_model_folder(s.accelerator, s.learner.unwrapped, write, s.run_dir / "best", "best model")


def reference_model(cfg: RunConfig, learner: Learner) -> torch.nn.Module | None:
    """The frozen initial policy on ``dpo.reference_device`` (default: the policy's); None for SimPO."""
    if cfg.dpo.loss == "simpo":
        return None
    return load_frozen_reference(cfg.model, cfg.dpo.reference_device or learner.device, learner.accelerator)


# ---- the mode ------------------------------------------------------------------------------------
Step = tuple[list[list[PreferencePair]], list[bool]]  # this rank's micro-batches, which are stand-ins
TRAIN_GLOBAL_KEYS = tuple(f"train/{name}" for name in PAIR_METRICS)  # `dpo_update`'s means over all ranks


def preference_epochs(s: Session, train: Sequence[PreferencePair]) -> Callable[[int], Iterator[Step]]:
    """Epoch e's optimizer batches, each dealt to the ranks in equal numbers of micro-batches."""
    d, rank, world = s.cfg.dpo, s.accelerator.process_index, s.accelerator.num_processes
    grad_accum = math.ceil(d.pairs_per_step / world / d.micro_batch_pairs)

    def epoch(e: int) -> Iterator[Step]:
        for rows in epoch_batches(len(train), d.pairs_per_step, s.cfg.seed * 100_003 + e):
            micro = deal_micro_batches(rows, grad_accum, rank, world)  # equal passes on every rank
            yield [[train[i] for i in m.rows] for m in micro], [m.dummy for m in micro]

    return epoch


def train_dpo(cfg: RunConfig, resume: bool = False) -> dict[str, float]:
    """Run DPO / IPO / SimPO as configured; returns the final validation metrics (+ ``eval/best_accuracy``)."""
    if not cfg.data.preference_path:
        raise FileNotFoundError('mode "dpo" needs data.preference_path (JSONL of {"prompt","chosen","rejected"})')
    d = cfg.dpo
    with Session(cfg, resume) as s:
        pairs, identical = drop_identical_pairs(read_preference_pairs(cfg.data.preference_path),
                                                cfg.data.max_skipped_fraction, cfg.data.preference_path)
        train_idx, held_idx = split_heldout(len(pairs), d.validation_fraction, cfg.seed)
        train = [pairs[i] for i in train_idx]
        validate, best = Validator([pairs[i] for i in held_idx], d.micro_batch_pairs), BestModel(s)
        ref_model = reference_model(cfg, s.learner)
        per_epoch, start = steps_per_epoch(len(train), d.pairs_per_step), int(s.trainer_state["step"])
        s.tracker.log({"data/train_pairs": float(len(train)), "data/heldout_pairs": float(len(held_idx)),
                       "data/skipped_identical_pairs": float(identical)}, start)
        batches = step_stream(preference_epochs(s, train), per_epoch, start)

        def step(_: int) -> StepResult:
            micro_batches, dummies = next(batches)
            with s.timer("train"):
                return dpo_update(s.learner, ref_model, cfg, micro_batches, dummies), TRAIN_GLOBAL_KEYS

        def evaluate(step: int) -> dict[str, float]:
            with s.timer("eval"):
                metrics = validate(s.learner, ref_model, d)
            metrics |= best.update(step, metrics)
            s.tracker.log(metrics, step)
            return metrics

        return run(s, Mode(
            name=d.loss, total_steps=d.max_steps or d.num_epochs * per_epoch, step=step, evaluate=evaluate,
            postfix=lambda m: {"loss": f"{m.get('train/loss', math.nan):.3f}",
                               "acc": f"{m.get('train/accuracy', math.nan):.2f}"},
            checkpoint_state=best.state,
        ))
