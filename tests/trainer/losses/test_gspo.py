"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071), `compute_gspo_loss`: the
per-token GSPO-token loss by hand, and, reduced by the ``sequence_mean`` aggregation, the value and gradient of
GSPO's own sequence-level objective (eq. 5, with the sequence ratio of eq. 7) written as a plain loop."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import aggregate_loss, compute_gspo_loss, compute_policy_gradient_loss


def gspo_objective(adv: torch.Tensor, logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, eps_low: float,
                   eps_high: float) -> torch.Tensor:
    """−J_GSPO (eq. 5): −(1/G) Σ_i min(s_i A_i, clip(s_i, 1−ε_low, 1+ε_high) A_i), with
    s_i = (π_θ(y_i)/π_old(y_i))^{1/|y_i|} (eq. 7) summed token by token over the response; a row without
    response tokens counts in G and adds 0."""
    terms = []
    for i in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if mask[i, t]]
        if not tokens:  # no response token (e.g. masked by grpo.mask_truncated): counted in G, adds nothing
            terms.append(torch.zeros((), dtype=logp.dtype))
            continue
        log_ratio = sum((logp[i, t] - old[i, t] for t in tokens), torch.zeros((), dtype=logp.dtype))
        s = torch.exp(log_ratio / len(tokens))
        a = adv[i, 0]
        terms.append(torch.minimum(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a))
    return -torch.stack(terms).mean()


def test_gspo_by_hand() -> None:
    """One row, tokens with log ratios ln 1.5 and ln 0.5 → s = sqrt(0.75) = 0.8660; A = 2 → every token's loss
    −1.7321; A = −1 with ε = 0.1 → clip to 0.9: loss min(−0.866, −0.9)·−1 = 0.9, clipped, no gradient."""
    logp = torch.tensor([[math.log(1.5), math.log(0.5), -7.0]], dtype=torch.float64, requires_grad=True)
    old, mask = torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[True, True, False]])
    loss, meta = compute_gspo_loss(torch.tensor([[2.0]], dtype=torch.float64), logp, old, mask, 0.2, 0.2)
    assert loss[0, :2].tolist() == pytest.approx([-2 * math.sqrt(0.75)] * 2, abs=1e-12)
    assert not meta["clipped"].any()
    (loss * mask).sum().backward()
    assert logp.grad is not None and logp.grad[0].tolist() == pytest.approx([-2 * math.sqrt(0.75)] * 2 + [0.0])
    loss, meta = compute_gspo_loss(torch.tensor([[-1.0]], dtype=torch.float64), logp, old, mask, 0.1, 0.1)
    assert loss[0, :2].tolist() == pytest.approx([0.9, 0.9], abs=1e-12) and meta["clipped"][0, :2].all()


@pytest.mark.parametrize("seed", range(5))
def test_sequence_mean_of_gspo_token_is_the_gspo_objective(seed: int) -> None:
    """Random rows of different response lengths (one empty), log ratios large enough that some rows clip and
    some do not, clip-higher ε: the aggregated loss and its gradient equal the sequence-level objective's."""
    gen = torch.Generator().manual_seed(seed)
    b, s = 6, 9
    logp = -3 * torch.rand(b, s, generator=gen, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(b, s, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 0, 7, 3])
    mask = torch.arange(s)[None, :] < lengths[:, None]
    adv = torch.randn(b, 1, generator=gen, dtype=torch.float64)
    mine, theirs = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    per_token, meta = compute_policy_gradient_loss(mine, "gspo", advantages=adv, old_log_probs=old,
                                                   cliprange_low=0.05, cliprange_high=0.1, response_mask=mask)
    loss = aggregate_loss(per_token, mask, "sequence_mean")
    want = gspo_objective(adv, theirs, old, mask, 0.05, 0.1)
    loss.backward()
    want.backward()
    assert mine.grad is not None and theirs.grad is not None
    assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=1e-12)
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)
    rows_clipped = meta["clipped"].any(-1)
    assert torch.equal(meta["clipped"], rows_clipped[:, None].expand(b, s))  # a whole row clips, or none of it
    if seed == 0:
        assert 0 < int(rows_clipped[lengths > 0].sum()) < 5  # both kinds of row are exercised


def test_gspo_needs_the_response_mask_and_a_cliprange() -> None:
    logp, adv = torch.zeros(2, 3), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="needs response_mask"):
        compute_policy_gradient_loss(logp, "gspo", advantages=adv, old_log_probs=logp, cliprange=0.2)
    with pytest.raises(ValueError, match="'gspo' needs cliprange"):
        compute_policy_gradient_loss(logp, "gspo", advantages=adv, old_log_probs=logp,
                                     response_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="disagree"):
        compute_gspo_loss(adv, logp, logp, torch.ones(2, 4), 0.2, 0.2)
