"""Per-token policy-gradient losses: hand values, naive scalar loops, gradcheck, dispatcher errors."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (
    POLICY_LOSS_TYPES,
    compute_cispo_loss,
    compute_grpo_clip_loss,
    compute_grpo_no_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
)

LN15 = math.log(1.5)
LN05 = math.log(0.5)


def _random(
    seed: int, b: int = 4, s: int = 6, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(b, 1, generator=gen, dtype=dtype)
    logp = -torch.rand(b, s, generator=gen, dtype=dtype) * 3
    old = logp + torch.randn(b, s, generator=gen, dtype=dtype) * 0.4
    return adv, logp, old


# ---- naive ----------------------------------------------------------------------------------------------


def test_naive_hand_values() -> None:
    """A = [[2], [−1]], log p = [[−1, −2], [−0.5, 0]] → −A·log p = [[2, 4], [−0.5, 0]]."""
    got = compute_naive_policy_gradient_loss(
        torch.tensor([[2.0], [-1.0]]), torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    )
    torch.testing.assert_close(got, torch.tensor([[2.0, 4.0], [-0.5, 0.0]]))


def test_naive_matches_loop_and_accepts_1d() -> None:
    adv, logp, _ = _random(0)
    got = compute_naive_policy_gradient_loss(adv, logp)
    want = torch.tensor([[-float(adv[i, 0]) * float(logp[i, t]) for t in range(6)] for i in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compute_naive_policy_gradient_loss(adv.squeeze(-1), logp), got)
    with pytest.raises(ValueError, match="batch, 1"):
        compute_naive_policy_gradient_loss(torch.zeros(4, 6), logp)


def test_naive_gradcheck() -> None:
    adv, logp, _ = _random(1, dtype=torch.float64)
    logp.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: compute_naive_policy_gradient_loss(adv, lp), (logp,))


# ---- GRPO-Clip ------------------------------------------------------------------------------------------


def test_grpo_clip_hand_values() -> None:
    """ε = 0.2, one token per row, log ρ as below:
    ρ=1.5, A=+1: min(1.5, 1.2) = 1.2  → loss −1.2, clipped;
    ρ=1.5, A=−1: min(−1.5, −1.2) = −1.5 → loss 1.5, not clipped;
    ρ=0.5, A=+1: min(0.5, 0.8) = 0.5  → loss −0.5, not clipped;
    ρ=0.5, A=−1: min(−0.5, −0.8) = −0.8 → loss 0.8, clipped;
    ρ=1,   A=+2: loss −2, not clipped. clip_fraction = 2/5."""
    adv = torch.tensor([[1.0], [-1.0], [1.0], [-1.0], [2.0]])
    logp = torch.tensor([[LN15], [LN15], [LN05], [LN05], [0.0]])
    old = torch.zeros(5, 1)
    loss, meta = compute_grpo_clip_loss(adv, logp, old, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2], [1.5], [-0.5], [0.8], [-2.0]]))
    assert meta["clipped"].tolist() == [[True], [False], [False], [True], [False]]
    torch.testing.assert_close(meta["clip_fraction"], torch.tensor(0.4))


def test_grpo_clip_higher_hand_values() -> None:
    """ε_low = 0.2, ε_high = 0.28 (DAPO): ρ=1.5, A=+1 → −1.28; ρ=0.5, A=−1 → clip at 0.8 → 0.8."""
    adv = torch.tensor([[1.0], [-1.0]])
    logp = torch.tensor([[LN15], [LN05]])
    loss, meta = compute_grpo_clip_loss(adv, logp, torch.zeros(2, 1), 0.2, cliprange_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.28], [0.8]]))
    assert meta["clipped"].all()
    loss2, _ = compute_grpo_clip_loss(
        adv, logp, torch.zeros(2, 1), 0.5, cliprange_low=0.2, cliprange_high=0.28
    )
    torch.testing.assert_close(loss2, loss)


@pytest.mark.parametrize(("low", "high"), [(0.2, 0.2), (0.1, 0.3)])
def test_grpo_clip_matches_scalar_loop(low: float, high: float) -> None:
    adv, logp, old = _random(2)
    loss, meta = compute_grpo_clip_loss(adv, logp, old, low, cliprange_high=high)
    for i in range(4):
        for t in range(6):
            a = float(adv[i, 0])
            rho = math.exp(float(logp[i, t]) - float(old[i, t]))
            unclipped, clipped = rho * a, min(max(rho, 1 - low), 1 + high) * a
            assert float(loss[i, t]) == pytest.approx(-min(unclipped, clipped), rel=1e-6, abs=1e-7)
            assert bool(meta["clipped"][i, t]) == (clipped < unclipped)
    assert 0 < float(meta["clip_fraction"]) < 1


def test_grpo_clip_gradcheck_and_zero_grad_when_clipped() -> None:
    adv, logp, old = _random(3, dtype=torch.float64)
    logp.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: compute_grpo_clip_loss(adv, lp, old, 0.2)[0], (logp,))
    loss, meta = compute_grpo_clip_loss(adv, logp, old, 0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert meta["clipped"].any()
    assert (grad[meta["clipped"]] == 0).all()
    # unclipped tokens: d(−ρA)/d log π = −ρA
    ratio = torch.exp(logp - old).detach()
    free = ~meta["clipped"]
    torch.testing.assert_close(grad[free], (-ratio * adv)[free])


def test_old_log_probs_get_no_gradient() -> None:
    adv, logp, old = _random(4)
    old.requires_grad_(True)
    loss, _ = compute_grpo_clip_loss(adv, logp.requires_grad_(True), old, 0.2)
    loss.sum().backward()
    assert old.grad is None


# ---- GRPO-No-Clip ---------------------------------------------------------------------------------------


def test_grpo_no_clip_hand_values_loop_and_gradcheck() -> None:
    """ρ = 1.5, A = 2 → −3; ρ = 0.5, A = −1 → 0.5."""
    loss, meta = compute_grpo_no_clip_loss(
        torch.tensor([[2.0], [-1.0]]), torch.tensor([[LN15], [LN05]]), torch.zeros(2, 1)
    )
    torch.testing.assert_close(loss, torch.tensor([[-3.0], [0.5]]))
    assert meta == {}
    adv, logp, old = _random(5)
    got, _ = compute_grpo_no_clip_loss(adv, logp, old)
    want = torch.tensor(
        [[-math.exp(float(logp[i, t] - old[i, t])) * float(adv[i, 0]) for t in range(6)] for i in range(4)]
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    adv64, logp64, old64 = _random(6, dtype=torch.float64)
    logp64.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: compute_grpo_no_clip_loss(adv64, lp, old64)[0], (logp64,))


# ---- CISPO ----------------------------------------------------------------------------------------------


def test_cispo_hand_values_gradient_and_loop() -> None:
    """ε = 0.2: ρ = 1.5 → weight 1.2 (clipped), A = 2, log π = ln 1.5 → loss −2.4 · ln 1.5, gradient −2.4;
    ρ = 0.5 → weight 0.8 (clipped), A = −1 → loss 0.8 · ln 0.5, gradient 0.8; ρ = 1.1 inside the range. Unlike
    GRPO-Clip, a clipped token keeps its gradient: only its weight is bounded, and no gradient flows through it."""
    logp = torch.tensor([[LN15], [LN05], [math.log(1.1)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[2.0], [-1.0], [1.0]], dtype=torch.float64)
    loss, meta = compute_cispo_loss(adv, logp, torch.zeros(3, 1, dtype=torch.float64), 0.2, 0.2)
    want = [-2.4 * LN15, 0.8 * LN05, -1.1 * math.log(1.1)]
    assert loss[:, 0].tolist() == pytest.approx(want, abs=1e-12)
    assert meta["clipped"][:, 0].tolist() == [True, True, False]
    loss.sum().backward()
    assert logp.grad is not None and logp.grad[:, 0].tolist() == pytest.approx([-2.4, 0.8, -1.1], abs=1e-12)
    adv, logp, old = _random(9)
    got, _ = compute_cispo_loss(adv, logp, old, 0.1, 0.3)
    want_loop = torch.tensor([[-min(max(math.exp(float(logp[i, t] - old[i, t])), 0.9), 1.3) * float(adv[i, 0])
                               * float(logp[i, t]) for t in range(6)] for i in range(4)])
    torch.testing.assert_close(got, want_loop, rtol=1e-6, atol=1e-7)


# ---- dispatcher -----------------------------------------------------------------------------------------


def test_dispatch_matches_direct_calls() -> None:
    adv, logp, old = _random(7)
    raw = torch.rand(4, 1)
    got, _ = compute_policy_gradient_loss(logp, "no_baseline", raw_rewards=raw)
    torch.testing.assert_close(got, compute_naive_policy_gradient_loss(raw, logp))
    got, _ = compute_policy_gradient_loss(logp, "reinforce_with_baseline", advantages=adv)
    torch.testing.assert_close(got, compute_naive_policy_gradient_loss(adv, logp))
    got, meta = compute_policy_gradient_loss(
        logp, "grpo_clip", advantages=adv, old_log_probs=old, cliprange=0.2
    )
    want, want_meta = compute_grpo_clip_loss(adv, logp, old, 0.2)
    torch.testing.assert_close(got, want)
    assert torch.equal(meta["clipped"], want_meta["clipped"])
    got, _ = compute_policy_gradient_loss(
        logp, "grpo_clip", advantages=adv, old_log_probs=old, cliprange_low=0.1, cliprange_high=0.3
    )
    torch.testing.assert_close(got, compute_grpo_clip_loss(adv, logp, old, 0.1, cliprange_high=0.3)[0])
    got, _ = compute_policy_gradient_loss(logp, "grpo_no_clip", advantages=adv, old_log_probs=old)
    torch.testing.assert_close(got, compute_grpo_no_clip_loss(adv, logp, old)[0])
    got, _ = compute_policy_gradient_loss(logp, "cispo", advantages=adv, old_log_probs=old, cliprange=0.2,
                                          cliprange_high=0.3)
    torch.testing.assert_close(got, compute_cispo_loss(adv, logp, old, 0.2, 0.3)[0])


def test_dispatch_errors_name_missing_args() -> None:
    _, logp, old = _random(8)
    adv = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="raw_rewards"):
        compute_policy_gradient_loss(logp, "no_baseline", advantages=adv)
    with pytest.raises(ValueError, match="advantages"):
        compute_policy_gradient_loss(logp, "reinforce_with_baseline", raw_rewards=adv)
    with pytest.raises(ValueError, match="old_log_probs"):
        compute_policy_gradient_loss(logp, "grpo_clip", advantages=adv, cliprange=0.2)
    with pytest.raises(ValueError, match="cliprange"):
        compute_policy_gradient_loss(logp, "grpo_clip", advantages=adv, old_log_probs=old)
    with pytest.raises(ValueError, match="old_log_probs"):
        compute_policy_gradient_loss(logp, "grpo_no_clip", advantages=adv)
    with pytest.raises(ValueError, match="grpo_no_clip") as err:
        compute_policy_gradient_loss(logp, "ppo", advantages=adv)
    assert all(name in str(err.value) for name in POLICY_LOSS_TYPES)
