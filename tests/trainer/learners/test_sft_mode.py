"""SFT mode end to end on the tiny Qwen2 (CPU): through the real CLI / `train_sft`, configs/tiny/sft_tiny_cpu.yaml.

Runs single-threaded (`one_thread`): on the shared 2-core machine, two OpenMP threads competing with other
processes made these runs 3-4× slower.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cs336_adapters import sft_microbatch_train_step
from helpers import REPO, capture_grads_at_step, rank_micro_batches
from safetensors.torch import load_file

from trainer.cli import main as cli_main
from trainer.config_io import load_config
from trainer.data.prompts import format_prompt
from trainer.data.sft import read_sft_examples
from trainer.data.tasks import DatasetFormatError, make_arithmetic
from trainer.data.tokenization import pair_batch
from trainer.learner import Learner
from trainer.learners.sft import heldout_loss, sft_update, train_sft
from trainer.tracking import read_metrics

CONFIG = REPO / "configs" / "tiny" / "sft_tiny_cpu.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_arithmetic_sft(path: Path, n: int, wrong_every: int = 0) -> list[dict[str, str]]:
    """r1_zero reasoning SFT lines on single-digit addition; every `wrong_every`-th response is wrong."""
    rows = []
    for i, ex in enumerate(make_arithmetic(n, seed=5, level=1)):
        answer = str(int(ex.answer) + 1) if wrong_every and i % wrong_every == 0 else ex.answer
        rows.append({"prompt": format_prompt("r1_zero", question=ex.question),
                     "response": f" {ex.solution} </think> <answer> {answer} </answer>", "answer": ex.answer})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def overrides(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data.sft_path={data}", f"output_dir={out}", *extra]


def hf_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (ckpt,) = sorted((run_dir / "checkpoints").iterdir())[-1:]
    return load_file(ckpt / "hf" / "model.safetensors")


def test_sft_lowers_heldout_loss_via_cli(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """30 steps of reasoning SFT (lr 3e-3) on 160 examples; 40 held out.

    Measured: held-out NLL 6.96 → 0.69 nats/token. The assertion asks for a 3× drop. The held-out set is
    fixed and the run deterministic, so the only noise is which 40 examples are held out; a random init
    predicts ~ln(1024) = 6.9 nats/token, and a drop of over 4 nats on held-out examples cannot come from
    that choice — it needs the model to learn the response format and the digits. (Held-out examples, not
    unseen questions: single-digit addition has 100 distinct questions, so most of the 40 also occur among
    the 160 trained on; this checks that SFT fits, not that it generalises.)
    """
    data = tmp_path / "sft.jsonl"
    write_arithmetic_sft(data, 200)
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(CONFIG), *overrides(tiny_qwen2_path, data, out)]) == 0
    records = read_metrics(out)
    heldout = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    assert [s for s, _ in heldout] == [0, 30]
    before, after = heldout[0][1], heldout[-1][1]
    assert after < before / 3, heldout
    train_losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(train_losses) == 30 and all(map(torch.isfinite, torch.tensor(train_losses)))
    assert all(r["train/learner_tokens_per_s"] > 0 and r["train/model_tflops_per_s"] > 0
               for r in records if "train/loss" in r)
    assert next(r for r in records if "data/sft_train_examples" in r)["data/sft_train_examples"] == 160
    # sft.eval_generation: held-out generation metrics through the shared evaluator, before and after
    generation = [
        (r["step"], r["eval/accuracy"], r["eval/format_rate"]) for r in records if "eval/accuracy" in r
    ]
    assert [g[0] for g in generation] == [0, 30]
    assert all(0.0 <= a <= f <= 1.0 for _, a, f in generation)
    assert generation[0][2] == 0.0 and generation[-1][2] >= 0.9  # measured: format rate 0 → 1.0 (greedy)
    # every trainable parameter changed
    initial = load_file(Path(tiny_qwen2_path) / "model.safetensors")
    final = hf_weights(out)
    assert set(initial) == set(final)
    unchanged = [k for k in initial if torch.equal(initial[k], final[k])]
    assert not unchanged, unchanged


def test_filter_correct_and_max_examples(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """Every 4th response is wrong: filtering keeps exactly the right ones (graded by the reward module)."""
    data = tmp_path / "sft.jsonl"
    rows = write_arithmetic_sft(data, 40, wrong_every=4)
    data.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "response": r["response"], "ground_truth": r["answer"]}) + "\n"
            for r in rows
        )
    )  # CS336's name for the gold field
    cfg = load_config(CONFIG, overrides(tiny_qwen2_path, data, tmp_path / "run", "sft.filter_correct=true",
                                        "sft.max_examples=20", "sft.max_steps=1", "sft.validation_fraction=0.1"))  # fmt: skip
    train_sft(cfg)
    records = read_metrics(tmp_path / "run")
    logged = {k: v for r in records for k, v in r.items() if k.startswith("data/")}
    from trainer.data.sampler import split_heldout

    train_idx, _ = split_heldout(len(rows), 0.1, cfg.seed)
    n_correct = sum(f"<answer> {rows[i]['answer']} </answer>" in rows[i]["response"] for i in train_idx)
    assert logged["data/sft_examples_before_filter"] == 36
    assert logged["data/sft_examples_correct"] == n_correct < 36
    assert logged["data/sft_train_examples"] == 20  # max_examples of the correct ones


def test_packed_instruction_tuning_lowers_heldout_loss(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """Alpaca-packed blocks of 64 tokens: held-out loss falls (measured 6.92 → 2.48 in 12 steps; asked: 1.5×,
    deterministic run, random-init baseline ln(1024) ≈ 6.9)."""
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"prompt": ex.question, "response": f"The answer is {ex.answer}."}) + "\n"
                            for ex in make_arithmetic(150, seed=1, level=1)))  # fmt: skip
    cfg = load_config(CONFIG, overrides(tiny_qwen2_path, data, tmp_path / "run", "sft.packed=true",
                                        "sft.seq_length=64", "sft.max_steps=12", "sft.batch_size=8"))  # fmt: skip
    final = train_sft(cfg)
    records = read_metrics(tmp_path / "run")
    before = next(r["eval/loss"] for r in records if "eval/loss" in r)
    assert final["eval/loss"] < before / 1.5, (before, final)


def test_resume_matches_straight_run(tmp_path: Path, tiny_qwen2_path: str) -> None:
    """4 steps straight == 2 steps, then `--resume` for 2 more: optimizer state, step and data order are
    restored. Both runs are deterministic single-threaded CPU float32, so the parameters must agree to 1e-6
    (measured: bit-identical); a wrong data order or a fresh AdamW state would differ by far more, since
    each step at lr 3e-3 moves parameters by ~1e-3."""
    data = tmp_path / "sft.jsonl"
    write_arithmetic_sft(data, 64)
    common = ["sft.batch_size=8", "sft.gradient_accumulation_steps=2"]
    assert cli_main(["train", "--config", str(CONFIG),
                     *overrides(tiny_qwen2_path, data, tmp_path / "straight", "sft.max_steps=4", *common)]) == 0  # fmt: skip
    assert cli_main(["train", "--config", str(CONFIG),
                     *overrides(tiny_qwen2_path, data, tmp_path / "halves", "sft.max_steps=2", *common)]) == 0  # fmt: skip
    # the resumed run takes everything else (model, data, batch shape) from the run's saved config.yaml
    assert cli_main(["train", "--resume", str(tmp_path / "halves"), "sft.max_steps=4"]) == 0
    straight, resumed = hf_weights(tmp_path / "straight"), hf_weights(tmp_path / "halves")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
    steps = [r["step"] for r in read_metrics(tmp_path / "halves") if "train/loss" in r]
    assert steps == [1, 2, 3, 4]


def test_sft_update_equals_cs336_step(tiny_qwen2_path: str) -> None:
    """Naive twin: `sft_update` over ragged micro-batches gives the gradient of
    `sft_microbatch_train_step(length_normalization="token")` on the whole batch at once (to 1e-6)."""
    from trainer.config import ModelConfig, OptimConfig

    learner = Learner(ModelConfig(path=tiny_qwen2_path, dtype="float32"), OptimConfig(learning_rate=1.0))
    rows = [(format_prompt("r1_zero", question=ex.question), f" {ex.solution} </think> <answer> {ex.answer} </answer>")
            for ex in make_arithmetic(5, seed=2, level=2)]  # fmt: skip
    whole = pair_batch(learner.tokenizer, [p for p, _ in rows], [r for _, r in rows])
    from trainer.logprobs import get_response_log_probs

    lp = get_response_log_probs(learner.model, whole.input_ids, whole.labels)["log_probs"]
    sft_microbatch_train_step(lp, whole.response_mask, 1, length_normalization="token",
                              global_token_count=whole.response_mask.sum())  # fmt: skip
    expected = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}
    learner.optimizer.zero_grad(set_to_none=True)
    # capture the gradients sft_update accumulates, just before its optimizer step
    captured = capture_grads_at_step(learner)
    micro = [pair_batch(learner.tokenizer, [rows[i][0] for i in m], [rows[i][1] for i in m])
             for m in rank_micro_batches(range(5), 2)]  # fmt: skip
    assert [len(m) for m in micro] == [3, 2]
    metrics = sft_update(learner, micro)
    assert set(captured) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(
            captured[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    nll = heldout_loss(learner.model, [whole], learner.device)
    assert metrics["train/response_tokens"] == float(whole.response_mask.sum())
    assert torch.isfinite(torch.tensor([metrics["train/loss"], nll])).all()


def test_bad_sft_input_names_file_and_line(tmp_path: Path, tiny_qwen2_path: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DatasetFormatError, match=rf"{bad}:3: missing key 'response'"):
        train_sft(load_config(CONFIG, overrides(tiny_qwen2_path, bad, tmp_path / "run")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetFormatError, match=rf"{empty}: no records \(empty file\)"):
        read_sft_examples(empty)
    with pytest.raises(FileNotFoundError, match=r"data\.sft_path="):
        read_sft_examples(tmp_path / "missing.jsonl")


def test_pair_batch_attention_mask_excludes_padding(tiny_qwen2_path: str) -> None:
    """Rows of different lengths: ids, labels and response mask are `tokenize_prompt_and_output`'s, and the
    attention mask marks exactly the real input positions (``min(|p| + |r|, T − 1)`` per row, a prefix), so
    the throughput lengths and the packed row (`model.packing`) hold no padding. Before, the mask was all
    ones: every row counted T − 1 tokens."""
    from trainer.data.tokenization import tokenize_prompt_and_output
    from trainer.learner import load_tokenizer
    from trainer.logprobs import pack, real_lengths

    tok = load_tokenizer(tiny_qwen2_path)
    prompts = ["What is 2 + 3?", "Add 1 and 1, then explain every step slowly.", "Q"]
    responses = [" 5", " First 1 + 1 = 2. So the answer is 2.", " a longer answer, with a few more words"]
    batch = pair_batch(tok, prompts, responses)
    naive = tokenize_prompt_and_output(prompts, responses, tok)
    assert torch.equal(batch.input_ids, naive["input_ids"]) and torch.equal(batch.labels, naive["labels"])
    assert torch.equal(batch.response_mask, naive["response_mask"])
    lengths = [len(ids) for ids in tok([p + r for p, r in zip(prompts, responses, strict=True)],
                                       add_special_tokens=False)["input_ids"]]  # fmt: skip
    width = batch.input_ids.shape[1]  # T − 1
    expected = [min(n, width) for n in lengths]
    assert len(set(expected)) == 3 and min(expected) < width  # ragged: two rows carry padding
    assert real_lengths(batch).tolist() == expected
    for row, n in zip(batch.attention_mask, expected, strict=True):
        assert row[:n].eq(1).all() and row[n:].eq(0).all()
    assert pack(batch).input_ids.shape[1] == sum(expected)


def test_numeric_gold_is_read_as_its_string(tmp_path: Path) -> None:
    """CS336 converts numeric ground truth with str(); a number is accepted the same way (bool is not a
    number here), any other type names the file, line and key."""
    good = tmp_path / "good.jsonl"
    rows = [{"prompt": "p", "response": "r", "answer": 5}, {"prompt": "p", "response": "r", "gold": 2.5},
            {"prompt": "p", "response": "r", "ground_truth": "7"}, {"prompt": "p", "response": "r"}]  # fmt: skip
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [ex.gold for ex in read_sft_examples(good)] == ["5", "2.5", "7", None]
    for value, kind in ((True, "bool"), ([5], "list"), (None, "NoneType")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n"
                       + json.dumps({"prompt": "p", "response": "r", "answer": value}) + "\n")  # fmt: skip
        message = rf"{bad}:2: 'answer' must be a string or a number, got {kind}"
        with pytest.raises(DatasetFormatError, match=message):
            read_sft_examples(bad)
