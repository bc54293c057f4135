"""grpo/sft micro-batch steps: hand-worked loss and gradients, naive reference, returned loss semantics."""

from __future__ import annotations

import pytest
import torch
from cs336_adapters import grpo_microbatch_train_step, sft_microbatch_train_step

from trainer.losses import compute_grpo_clip_loss

LOGP = [[-1.0, -2.0], [-3.0, -4.0]]
MASK = torch.tensor([[1, 1], [1, 0]])


def _leaf(values: list[list[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def test_grpo_step_hand_values_sequence_mean() -> None:
    """log p = [[−1, −2], [−3, −4]], m = [[1, 1], [1, 0]], rewards [[1], [2]], no_baseline, G = 2:
    per-token loss −r·log p = [[1, 2], [6, 8]]; sequence means [1.5, 6] → mean 3.75 → /2 = 1.875.
    d loss / d log p_it = −r_i / (G·B·n_i): row 0: −1/(2·2·2) = −0.125 each; row 1: [−2/(2·2·1), 0] = [−0.5, 0]."""
    logp = _leaf(LOGP)
    loss, _ = grpo_microbatch_train_step(
        logp, MASK, 2, "no_baseline", raw_rewards=torch.tensor([[1.0], [2.0]])
    )
    torch.testing.assert_close(loss, torch.tensor(1.875))
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.125, -0.125], [-0.5, 0.0]]))
    assert not loss.requires_grad


def test_grpo_step_hand_values_constant_and_token() -> None:
    """Same inputs, reinforce_with_baseline with A = [[1], [2]]:
    constant C = 4, G = 1: sums [3, 6] / 4 = [0.75, 1.5] → mean 1.125; grad −A_i/(B·C) = [−0.125, −0.25].
    token N = 6 (global), W = 2: masked sum 9 → 9·2/6 = 3; grad −A_i·W/N = [−1/3, −2/3] on unmasked tokens."""
    adv = torch.tensor([[1.0], [2.0]])
    logp = _leaf(LOGP)
    loss, _ = grpo_microbatch_train_step(
        logp,
        MASK,
        1,
        "reinforce_with_baseline",
        advantages=adv,
        length_normalization="constant",
        normalize_constant=4,
    )
    torch.testing.assert_close(loss, torch.tensor(1.125))
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.125, -0.125], [-0.25, 0.0]]))
    logp = _leaf(LOGP)
    loss, _ = grpo_microbatch_train_step(
        logp,
        MASK,
        3,
        "reinforce_with_baseline",
        advantages=adv,
        length_normalization="token",
        global_token_count=6,
        world_size=2,
    )
    torch.testing.assert_close(loss, torch.tensor(3.0))
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [-2 / 3, 0.0]]))


@pytest.mark.parametrize("mode", ["sequence_mean", "constant", "token"])
def test_grpo_clip_step_matches_naive_reference(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    b, s = 4, 7
    adv = torch.randn(b, 1, generator=gen)
    base = -torch.rand(b, s, generator=gen) * 2
    old = base + torch.randn(b, s, generator=gen) * 0.3
    mask = torch.rand(b, s, generator=gen) > 0.3
    mask[:, 0] = True
    logp = base.clone().requires_grad_(True)
    loss, meta = grpo_microbatch_train_step(
        logp,
        mask,
        2,
        "grpo_clip",
        advantages=adv,
        old_log_probs=old,
        cliprange=0.2,
        length_normalization=mode,
        normalize_constant=9.0,
        global_token_count=40,
        world_size=2,
    )
    # naive reference: explicit per-row loops of the formulas
    ref_logp = base.clone().requires_grad_(True)
    per_token, clip_meta = compute_grpo_clip_loss(adv, ref_logp, old, 0.2)
    rows = []
    for i in range(b):
        row = per_token[i][mask[i]]
        rows.append(
            row.mean() if mode == "sequence_mean" else row.sum() / 9.0 if mode == "constant" else row.sum()
        )
    ref = torch.stack(rows).mean() / 2 if mode != "token" else torch.stack(rows).sum() * 2 / 40
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-7)
    assert logp.grad is not None and ref_logp.grad is not None
    torch.testing.assert_close(logp.grad, ref_logp.grad, rtol=1e-6, atol=1e-7)
    masked_fraction = clip_meta["clipped"][mask].float().mean()
    torch.testing.assert_close(meta["clip_fraction"], masked_fraction)


def test_grpo_step_float64_gradcheck_of_the_step_loss() -> None:
    """float64: the step's backward equals central finite differences (h = 1e-6) of the written-out loss."""
    gen = torch.Generator().manual_seed(1)
    adv = torch.randn(3, 1, generator=gen, dtype=torch.float64)
    base = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    old = base + 0.1 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    mask[:, 0] = True
    logp = base.clone().requires_grad_(True)
    grpo_microbatch_train_step(logp, mask, 2, "grpo_no_clip", advantages=adv, old_log_probs=old)
    numeric = torch.zeros_like(base)
    h = 1e-6
    for i in range(3):
        for t in range(5):

            def value(delta: float, i: int = i, t: int = t) -> float:
                x = base.clone()
                x[i, t] += delta
                ratio = torch.exp(x - old)
                rows = [(-(ratio[r] * adv[r, 0]))[mask[r]].mean() for r in range(3)]
                return float(torch.stack(rows).mean() / 2)

            numeric[i, t] = (value(h) - value(-h)) / (2 * h)
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, numeric, rtol=1e-6, atol=1e-8)


def test_sft_step_hand_values() -> None:
    """log p = [[−1, −2], [−3, −4]], m = [[1, 1], [1, 0]], C = 2, G = 1:
    masked sums [−3, −3] → −mean([−3/2, −3/2]) = 1.5; grad −1/(B·C·G) = −0.25 on unmasked tokens.
    With G = 2 both halve: 0.75 and −0.125."""
    logp = _leaf(LOGP)
    loss, meta = sft_microbatch_train_step(logp, MASK, 1, 2.0)
    torch.testing.assert_close(loss, torch.tensor(1.5))
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -0.25], [-0.25, 0.0]]))
    torch.testing.assert_close(meta["nll_per_token"], torch.tensor(2.0))  # (1 + 2 + 3) / 3
    assert int(meta["response_tokens"]) == 3
    logp = _leaf(LOGP)
    loss, _ = sft_microbatch_train_step(logp, MASK, 2, 2.0)
    torch.testing.assert_close(loss, torch.tensor(0.75))
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.125, -0.125], [-0.125, 0.0]]))


@pytest.mark.parametrize("mode", ["constant", "sequence_mean", "token"])
def test_sft_step_matches_naive(mode: str) -> None:
    gen = torch.Generator().manual_seed(2)
    base = -torch.rand(5, 8, generator=gen) * 3
    mask = torch.rand(5, 8, generator=gen) > 0.4
    mask[:, 0] = True
    logp = base.clone().requires_grad_(True)
    loss, _ = sft_microbatch_train_step(logp, mask, 4, 3.0, length_normalization=mode, global_token_count=50)
    ref_logp = base.clone().requires_grad_(True)
    nll = -(ref_logp * mask)
    if mode == "constant":
        ref = (nll.sum(-1) / 3.0).mean() / 4
    elif mode == "sequence_mean":
        ref = (nll.sum(-1) / mask.sum(-1)).mean() / 4
    else:
        ref = nll.sum() / 50
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-7)
    assert logp.grad is not None and ref_logp.grad is not None
    torch.testing.assert_close(logp.grad, ref_logp.grad, rtol=1e-6, atol=1e-8)


def test_step_errors_propagate() -> None:
    with pytest.raises(ValueError, match="normalize_constant"):
        grpo_microbatch_train_step(
            _leaf(LOGP), MASK, 1, "no_baseline", raw_rewards=torch.ones(2, 1), length_normalization="constant"
        )
    with pytest.raises(ValueError, match="global_token_count"):
        sft_microbatch_train_step(_leaf(LOGP), MASK, 1, length_normalization="token")
    with pytest.raises(ValueError, match="advantages"):
        grpo_microbatch_train_step(_leaf(LOGP), MASK, 1, "grpo_clip", cliprange=0.2)
