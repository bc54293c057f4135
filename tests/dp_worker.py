"""Data-parallel worker launched by ``tests/trainer/test_data_parallel.py`` (not a test module itself).

Run once as a plain process (world 1, the reference) and once under
``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2`` (gloo DDP, world 2). Both build the same seeded
global batch on the tiny GPT-2 (fp32) and run, through the real code:

- ``slicing``: `trainer.learners.grpo.sample_and_score` on a real `Session` with a stub rollout engine and the real
  reward scorer: which questions each rank generates for, its rewards, advantages and reward metrics
  (``slicing_batch_std``: the same with advantages over the whole batch's reward std);
- ``grpo/<mode>``: one optimizer step of `trainer.learners.grpo.update_policy` for each length-normalisation mode,
  each rank given its whole groups (rows ``[r·B/W, (r+1)·B/W)``, packed per rank as `to_batch` does);
- ``grpo/token_local_count``: a control with `global_token_count` patched to return the rank's own count
  (the classic DDP token-mean bug), which must *not* match the reference;
- ``sft``: one SFT optimizer step of `trainer.learners.sft.sft_update` (rows dealt by `rank_micro_batches`);
- ``files``: every file each rank opens for writing (or creates / renames / removes) under the run
  directory while the `Session` logs a metric and saves a checkpoint, recorded with an audit hook;
- ``slow_rank_checkpoint``: `save_checkpoint` when the last rank is late writing its state.

For each step it records the parameters after the step, the gradient seen by the optimizer (after the DDP
all-reduce and clipping), the pre-clip gradient norm, and every rank's metrics. Rank 0 writes
``OUT/results.pt``. Usage: ``python tests/dp_worker.py MODEL_DIR OUT_DIR WORLD``.

With ``dpo PAIRS_JSONL`` after WORLD it runs instead a whole DPO run, `trainer.learners.dpo.train_dpo`
(`dpo_run_config`: steps that split unevenly over 2 ranks), which writes ``OUT_DIR/run/metrics.jsonl``;
with ``sft SFT_JSONL`` a whole SFT run, `trainer.learners.sft.train_sft` (`sft_run_config`). Both record
the held-out forward passes each rank ran (``OUT_DIR/heldout_forwards_<rank>.json``,
`record_heldout_forwards`).
"""

from __future__ import annotations

import os
import sys
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GROUP = 4
QUESTIONS = 4
ROWS = GROUP * QUESTIONS  # rollout batch = train batch: one optimizer step
GRAD_ACC = 2
MAX_TOKENS = 24  # rollout.max_tokens: the "constant" normaliser
MODES = ("sequence_mean", "constant", "token")
LR, WARMUP = 1e-2, 10  # the first step runs at LR · 1/WARMUP; the logged train/lr is the next step's


def run_config(model_path: str, out_dir: Path, mode: str = "sequence_mean") -> Any:
    from trainer.config_io import config_from_dict

    return config_from_dict({
        "seed": 0,
        "output_dir": str(out_dir / "run"),
        "model": {"path": model_path, "dtype": "float32"},
        "data": {"task": "arithmetic"},
        "rollout": {"engine": "hf", "max_tokens": MAX_TOKENS, "min_tokens": 1},
        "reward": {"num_workers": 1, "timeout_s": 5.0},
        "optim": {"learning_rate": LR, "warmup_steps": WARMUP},
        "grpo": {
            "rollout_batch_size": ROWS, "group_size": GROUP, "train_batch_size": ROWS,
            "gradient_accumulation_steps": GRAD_ACC, "loss_type": "grpo_clip", "length_normalization": mode,
            "entropy_coef": 0.01, "tis_cap": 2.0, "overlong_buffer": MAX_TOKENS - 8,  # sample_and_score only
        },
        "logging": {"wandb_mode": "disabled", "progress": False},
    })  # fmt: skip


# ---- the global batch (identical on every rank) ----------------------------------------------------
def global_token_ids(vocab: int, variant: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of 3-9 tokens; responses long for the first half of the groups and short for the second,
    so the two ranks hold very different response-token counts (token mode must use the global count).
    Each `variant` is a different seeded batch."""
    gen = torch.Generator().manual_seed(1234 + variant)
    prompts: list[list[int]] = []
    responses: list[list[int]] = []
    for q in range(QUESTIONS):
        prompt = torch.randint(10, vocab, (int(torch.randint(3, 10, (1,), generator=gen)),), generator=gen)
        lo, hi = (10, MAX_TOKENS) if q < QUESTIONS // 2 else (1, 5)
        for _ in range(GROUP):
            n = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            prompts.append(prompt.tolist())
            responses.append(torch.randint(10, vocab, (n,), generator=gen).tolist())
    return prompts, responses


def rank_rows(rank: int, world: int) -> slice:
    """This rank's whole groups, by the rule of `trainer.learners.grpo._sample_groups` (questions [r·q, (r+1)·q))."""
    q = QUESTIONS // world
    return slice(rank * q * GROUP, (rank + 1) * q * GROUP)


def rollout_batch(learner: Any, rank: int, world: int, variant: int = 0) -> Any:
    """This rank's `RolloutBatch`: seeded rewards, group-normalised advantages, and off-policy old /
    rollout log-probs (current log-probs + seeded noise, so ratios differ from 1 and some are clipped)."""
    from trainer.advantages import group_normalize
    from trainer.data.batching import pack_token_ids
    from trainer.learners.grpo import RolloutBatch
    from trainer.logprobs import get_response_log_probs

    pad = learner.tokenizer.pad_token_id
    prompts, responses = global_token_ids(len(learner.tokenizer), variant)
    gen = torch.Generator().manual_seed(99 + variant)
    rewards = torch.randint(0, 2, (ROWS,), generator=gen).float()  # (B,)
    advantages = group_normalize(rewards, GROUP, 1e-6, True)  # (B,)
    rows = rank_rows(rank, world)
    tokens = pack_token_ids(prompts[rows], responses[rows], pad)  # packed per rank, like `to_batch`
    with torch.no_grad():  # through the prepared model: under ZeRO-3 the unwrapped one holds only shards
        mb = tokens.to(learner.device)
        out = get_response_log_probs(learner.model, mb.input_ids, mb.labels, attention_mask=mb.attention_mask)
    current = out["log_probs"].float().cpu()  # (b, s)
    # noise drawn for the global (B, width) grid and sliced, so it does not depend on the world size
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True)) - 1
    noise = 0.3 * torch.randn((2, ROWS, width), generator=gen)[:, rows, : current.shape[1]]  # (2, b, s)
    old, rollout = ((current + n) * tokens.response_mask for n in noise)  # rollout ≠ old: TIS weights ≠ 1
    return RolloutBatch(tokens, rewards[rows], advantages[rows], rollout_log_probs=rollout, old_log_probs=old)


# ---- one optimizer step, recorded ---------------------------------------------------------------
def flat_params(learner: Any) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in learner.unwrapped.parameters()])


def capture_grads(learner: Any) -> list[torch.Tensor]:
    """Records the gradient the optimizer steps with (after DDP all-reduce and clipping)."""
    seen: list[torch.Tensor] = []

    def hook(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.cat(grads).detach().clone())

    learner.optimizer.optimizer.register_step_pre_hook(hook)
    return seen


def grpo_case(cfg: Any, s: Any) -> dict[str, Any]:
    from trainer.learner import Learner
    from trainer.learners.grpo import update_policy

    learner = Learner(cfg.model, cfg.optim, s.accelerator)
    grads = capture_grads(learner)
    batch = rollout_batch(learner, s.accelerator.process_index, s.accelerator.num_processes)
    before = flat_params(learner)
    metrics = update_policy(learner, cfg, batch)
    return record(s, learner, before, grads, metrics, int(batch.tokens.response_mask.sum()))


def sft_case(cfg: Any, s: Any) -> dict[str, Any]:
    """One SFT optimizer step (`trainer.learners.sft.sft_update`, token-mean NLL) over the global batch, each rank
    taking its rows as `helpers.rank_micro_batches` deals them (``rows[rank::world]``)."""
    from helpers import rank_micro_batches

    from trainer.data.batching import pack_token_ids
    from trainer.learner import Learner
    from trainer.learners.sft import sft_update

    learner = Learner(cfg.model, cfg.optim, s.accelerator)
    grads = capture_grads(learner)
    prompts, responses = global_token_ids(len(learner.tokenizer))
    pad = learner.tokenizer.pad_token_id
    micro_rows = rank_micro_batches(
        range(ROWS), GRAD_ACC, s.accelerator.process_index, s.accelerator.num_processes
    )
    micro = [pack_token_ids([prompts[i] for i in m], [responses[i] for i in m], pad) for m in micro_rows]
    before = flat_params(learner)
    metrics = sft_update(learner, micro)
    return record(s, learner, before, grads, metrics, sum(int(mb.response_mask.sum()) for mb in micro))


def record(
    s: Any,
    learner: Any,
    before: torch.Tensor,
    grads: list[torch.Tensor],
    metrics: dict[str, float],
    response_tokens: int,
) -> dict[str, Any]:
    from accelerate.utils import gather_object

    assert len(grads) == 1, f"expected one optimizer step, saw {len(grads)}"
    after = flat_params(learner)
    # DDP keeps replicas identical: every rank must hold the same parameters after the step
    spread = gather_object([float((after - before).norm()), float(after.sum())])
    return {
        "params_before": before, "params": after, "grad": grads[0],
        "rank_metrics": gather_object([metrics]),
        "rank_response_tokens": gather_object([response_tokens]),
        "rank_param_digest": [spread[i : i + 2] for i in range(0, len(spread), 2)],
    }  # fmt: skip


# ---- rank slicing of rollouts (real sample_and_score, stub engine) ------------------------------
class StubEngine:
    """Deterministic 'generation': sample k of a prompt answers ``(crc32(prompt) + k) % 3 + 1`` after 1 to 5
    words (the same in every world)."""

    policy_version = 0

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def generate(self, prompts: Sequence[str], params: Any) -> list[Any]:
        from rollout.engines.protocol import Sample

        out = []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt)["input_ids"]
            for k in range(params.n):
                crc = zlib.crc32(prompt.encode()) + k  # lengths vary, so the overlong penalty does
                text = f"{' ok' * (1 + crc % 5)} </think> <answer> {crc % 3 + 1} </answer>"
                resp = self.tokenizer(text)["input_ids"]
                out.append(Sample(i, ids, resp, text, [-1.0] * len(resp), "stop", self.policy_version))
        return out

    def close(self) -> None:
        """Nothing to release."""


def slicing_case(s: Any) -> dict[str, Any]:
    from accelerate.utils import gather_object

    from trainer.data.sampler import QuestionSampler
    from trainer.data.tasks import Example
    from trainer.learners.grpo import sample_and_score

    s._engine = StubEngine(s.learner.tokenizer)  # the Session builds real engines lazily; this is a stub
    golds = [str(i % 3 + 1) for i in range(50)]
    sampler = QuestionSampler(
        [Example(f"question {i}: what is {i} mod 3 plus 1?", g) for i, g in enumerate(golds)], seed=0
    )
    samples, rewards, advantages, metrics = sample_and_score(s, sampler, step=1)
    prompts = [s.learner.tokenizer.decode(x.prompt_ids) for x in samples]
    return {
        "rank_prompts": gather_object([prompts]),
        "rank_rewards": gather_object([rewards.tolist()]),
        "rank_advantages": gather_object([advantages.tolist()]),
        "rank_metrics": gather_object([metrics]),
        "sampler_state": gather_object([sampler.state_dict()]),
    }


# ---- which rank writes which files ---------------------------------------------------------------
def start_write_audit(run_dir: Path) -> list[tuple[str, str]]:
    """Records (event, path) for every write-open / mkdir / rename / remove under `run_dir`."""
    root = str(run_dir.resolve())
    seen: list[tuple[str, str]] = []
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def under(path: Any) -> str | None:
        if isinstance(path, int):
            return None
        p = os.path.abspath(os.fsdecode(path))
        return os.path.relpath(p, root) if p == root or p.startswith(root + os.sep) else None

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
            if writing and (rel := under(path)) is not None:
                seen.append(("open", rel))
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree") and (
            (rel := under(args[0])) is not None
        ):
            seen.append((event, rel))

    sys.addaudithook(hook)
    return seen


def files_case(s: Any, writes: list[tuple[str, str]]) -> dict[str, Any]:
    from accelerate.utils import gather_object

    s.tracker.log({"train/loss": 1.0}, 1)
    s.save(1)
    s.accelerator.wait_for_everyone()
    return {"rank_writes": gather_object([sorted(set(writes))]), "listing": listing(s.run_dir)}


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def slow_rank_checkpoint_case(s: Any, root: Path, max_wait_s: float = 5.0) -> dict[str, Any]:
    """`save_checkpoint` while the last rank is slow to start writing its state (a slow filesystem,
    simulated in an audit hook: its ``mkdir`` of ``state/`` waits until the finished checkpoint directory
    appears, or `max_wait_s`): the checkpoint must still be complete, with no ``.tmp`` left behind."""
    from accelerate.utils import gather_object

    from trainer.checkpoint import checkpoint_dir, save_checkpoint

    slow = s.accelerator.process_index == s.accelerator.num_processes - 1 > 0
    state_dir = os.path.join(str(root.resolve()), "checkpoints", "step_000001.tmp", "state")
    final = checkpoint_dir(root, 1)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if (
            slow
            and event == "os.mkdir"
            and not isinstance(args[0], int)
            and os.fsdecode(args[0]) == state_dir
        ):
            deadline = time.monotonic() + max_wait_s
            while not final.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    sys.addaudithook(hook)
    learner = s.learner
    error = None
    try:
        save_checkpoint(s.accelerator, learner.model, learner.tokenizer, root, 1, {}, s.cfg, keep_last=2)
    except OSError as err:  # the slow rank's directory was renamed away under it
        error = f"{type(err).__name__}: {err}"
        s.accelerator.wait_for_everyone()  # the barrier that ends save_checkpoint on the other ranks
    s.accelerator.wait_for_everyone()
    return {"listing": listing(root), "rank_errors": gather_object([error])}


# ---- main -----------------------------------------------------------------------------------------
def main(model_path: str, out_dir: str, world: int) -> None:
    from trainer.session import Session

    out = Path(out_dir)
    cfg = run_config(model_path, out)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    writes = start_write_audit(run_dir)
    results: dict[str, Any] = {}
    with Session(cfg) as s:
        acc = s.accelerator
        wrapper = weakref.ref(s.learner.model)  # the DDP module: Session.close must free it (release_wrapper)
        if acc.num_processes != world:
            raise SystemExit(
                f"expected world size {world}, accelerate sees {acc.num_processes} "
                f"({acc.distributed_type}); CPU DDP needs ACCELERATE_USE_CPU=true"
            )
        results["world"] = acc.num_processes
        results["distributed_type"] = str(acc.distributed_type)
        results["group_size"], results["questions"], results["lr"], results["warmup"] = (
            GROUP,
            QUESTIONS,
            LR,
            WARMUP,
        )
        results["files"] = files_case(s, writes)  # first: the checkpoint holds only the Session's learner
        results["slow_rank_checkpoint"] = slow_rank_checkpoint_case(s, out / "slow")
        results["slicing"] = slicing_case(s)
        grpo_cfg = s.cfg.grpo
        s.cfg = s.cfg.model_copy(update={"grpo": grpo_cfg.model_copy(update={"std_normalization_scope": "batch"})})
        results["slicing_batch_std"] = slicing_case(s)  # the std of every rank's rewards
        s.cfg = s.cfg.model_copy(update={"grpo": grpo_cfg})
        for mode in MODES:
            results[f"grpo/{mode}"] = grpo_case(run_config(model_path, out, mode), s)
        import trainer.learners.grpo

        real = trainer.learners.grpo.global_token_count
        trainer.learners.grpo.global_token_count = lambda learner, mask: float(mask.sum())  # the bug, on purpose
        try:
            results["grpo/token_local_count"] = grpo_case(run_config(model_path, out, "token"), s)
        finally:
            trainer.learners.grpo.global_token_count = real
        results["sft"] = sft_case(cfg, s)
        if acc.is_main_process:
            torch.save(results, out / "results.pt")
        acc.wait_for_everyone()
    # Session.close freed the DDP wrapper before destroying the process group (a reducer freed after that
    # can hang the exit: `Learner.release_wrapper`). Checked here; the exit below stays abrupt as a second
    # guard, since that hang was seen once in ~6 runs before the fix (py-spy: ~Reducer →
    # ~ProcessGroupGloo → thread::join; runLoop → ~AsyncBarrierWork → gil_scoped_acquire).
    if (world > 1 and wrapper() is not None) or torch.distributed.is_initialized():
        raise SystemExit("Session.close left the DDP wrapper alive or the process group initialised")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- a whole DPO run ----------------------------------------------------------------------------
DPO_PAIRS_PER_STEP = 3  # over 2 ranks: 2 pairs on rank 0, 1 on rank 1


def whole_run_config(mode: str, data: dict[str, str], section: dict[str, Any], out_dir: Path, model_path: str) -> Any:
    """A `mode` run on the tiny model (float32, RMSprop at 1e-3, no warm-up) with `data` and its own config
    `section`: an evaluation every 2 steps, every step logged, the checkpoint at the end only."""
    from trainer.config_io import config_from_dict

    return config_from_dict({
        "mode": mode, "seed": 0, "output_dir": str(out_dir / "run"),
        "model": {"path": model_path, "dtype": "float32"},
        "data": data,
        "reward": {"num_workers": 1},
        "optim": {"optimizer": "rmsprop", "learning_rate": 1e-3, "warmup_steps": 0},
        mode: section,
        "eval": {"every": 2},
        "logging": {"wandb_mode": "disabled", "progress": False, "every": 1},
        "checkpoint": {"save_every": 0, "keep_last": 1},
    })  # fmt: skip


def dpo_run_config(model_path: str, pairs_path: str, out_dir: Path) -> Any:
    """DPO, 1 pair per micro-batch (no padding: the same forward shapes in every world)."""
    return whole_run_config("dpo", {"preference_path": pairs_path}, {
        "loss": "dpo", "beta": 0.1, "template": "alpaca", "max_steps": 4, "pairs_per_step": DPO_PAIRS_PER_STEP,
        "micro_batch_pairs": 1, "validation_fraction": 0.25}, out_dir, model_path)  # fmt: skip


def record_heldout_forwards(out_dir: str) -> Callable[[], None]:
    """Record each held-out forward pass of the policy this rank runs (`Validator` / `global_heldout_loss`,
    the only forwards under ``inference_mode``), stand-ins included, by the batch it was given: DPO the
    prompts, SFT the token ids. The returned function writes them to ``OUT_DIR/heldout_forwards_<rank>.json``."""
    import json

    from trainer.learners import dpo, sft

    forwards: list[Any] = []
    refs: list[Any] = []
    reference_model, pair_logps, forward_log_probs = dpo.reference_model, dpo.pair_logps, sft.forward_log_probs

    def reference_model_recorded(cfg: Any, learner: Any) -> Any:
        refs.append(reference_model(cfg, learner))
        return refs[-1]

    def pair_logps_recorded(model: Any, tokenizer: Any, pairs: Any, template: str, loss: str) -> Any:
        if torch.is_inference_mode_enabled() and not any(model is r for r in refs):
            forwards.append([p.prompt for p in pairs])
        return pair_logps(model, tokenizer, pairs, template, loss)

    def forward_log_probs_recorded(model: Any, tokens: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            forwards.append(tokens.input_ids.tolist())
        return forward_log_probs(model, tokens, **kwargs)

    dpo.reference_model, dpo.pair_logps = reference_model_recorded, pair_logps_recorded
    sft.forward_log_probs = forward_log_probs_recorded

    def write() -> None:
        Path(out_dir, f"heldout_forwards_{os.environ.get('RANK', '0')}.json").write_text(json.dumps(forwards))

    return write


def run_main(mode: str, model_path: str, out_dir: str, data_path: str) -> None:
    """A whole run of `mode` (dpo: `train_dpo` as `dpo_run_config` sets it up; sft: `train_sft` as
    `sft_run_config`), recording the held-out forwards; its `Session` refuses a torchrun world of 1 process."""
    from trainer.learners.dpo import train_dpo
    from trainer.learners.sft import train_sft

    write_forwards = record_heldout_forwards(out_dir)
    if mode == "dpo":
        train_dpo(dpo_run_config(model_path, data_path, Path(out_dir)))
    else:
        train_sft(sft_run_config(model_path, data_path, Path(out_dir)))
    write_forwards()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as `main`: no exit-time teardown left to hang


# ---- a whole SFT run ----------------------------------------------------------------------------
SFT_BATCH = 3  # over 2 ranks: 2 examples on rank 0, 1 on rank 1


def sft_run_config(model_path: str, sft_path: str, out_dir: Path) -> Any:
    """Reasoning SFT, 1 example per micro-batch (held-out ones too: no padding, the same forward shapes in
    every world)."""
    return whole_run_config("sft", {"sft_path": sft_path}, {
        "max_steps": 4, "batch_size": SFT_BATCH, "gradient_accumulation_steps": SFT_BATCH,
        "validation_fraction": 0.25}, out_dir, model_path)  # fmt: skip


if __name__ == "__main__":
    if sys.argv[4:5] in (["dpo"], ["sft"]):
        run_main(sys.argv[4], sys.argv[1], sys.argv[2], sys.argv[5])
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
