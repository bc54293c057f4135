"""The extra terms of the GRPO per-token loss, pinned against a hand-written twin.

`trainer.learners.grpo.micro_step` builds, per token (``trainer/grpo.py``, the block after
`compute_policy_gradient_loss`)::

    ℓ_t = PG_t(loss_type) · min(exp(old_t − rollout_t), tis_cap)      # TIS, weight detached
          + kl_coef · (exp(ref_t − lp_t) − (ref_t − lp_t) − 1)        # k3 KL to the frozen reference
          − entropy_coef · H_t                                         # entropy bonus

and reduces it with `aggregate_loss`. ``old`` is the learner's own log-prob under the parameters that
sampled the batch: the batch's ``old_log_probs`` off-policy, ``lp.detach()`` on-policy (so on-policy the
TIS weight is ``min(π_learner/π_rollout, cap)``; off-policy it is ``min(π_old/π_rollout, cap)``, the
learner-vs-engine mismatch at the sampling parameters, while the PPO ratio covers ``θ`` vs ``θ_old``).

Most tests drive the real `micro_step` with a stand-in learner whose "forward" returns hand-made leaf
tensors (log-probs and token entropies), so the gradient w.r.t. those tensors is read off directly and
compared with the gradient of `naive_loss` below, which restates the formulas plainly and imports nothing
from `trainer`. The frozen reference's log-probs come in by replacing `trainer.learners.grpo._ref_log_probs`.
One test runs the whole thing through the tiny Qwen2 model and a perturbed copy of it as the reference.

Tolerances. float64: 1e-12 (the two sides add the same handful of terms in a different order; rounding is
~1e-16 per operation). float32 inputs are compared with a float64 twin evaluated on the same values:
atol 1e-6, rtol 1e-5 — the quantities are O(1) and float32 carries ~1.2e-7 relative per rounding, a few
roundings per token plus a sum over ≤ 30 tokens. The real-model test allows 1e-5 relative per parameter
(the learner trims padding columns, so its matmuls have other shapes than the twin's full-width forward).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO

import trainer.learners.grpo as grpo
from trainer.config import RunConfig
from trainer.config_io import load_config
from trainer.data.batching import TokenBatch, pack_token_ids
from trainer.learner import Learner, load_model
from trainer.learners.grpo import RolloutBatch, micro_step
from trainer.losses import k3_kl

TINY_CONFIG = REPO / "configs" / "grpo_tiny_cpu.yaml"
LOSS_TYPES = ["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip", "gspo", "cispo"]
MODES = ["sequence_mean", "constant", "token"]
TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


# ---- the naive twin ------------------------------------------------------------------------------
def naive_pg(lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, raw: torch.Tensor, loss_type: str,
             eps_low: float, eps_high: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token policy-gradient loss, (b, s); adv / raw are (b,), mask (b, s) the response tokens."""
    a, r = adv[:, None], raw[:, None]
    if loss_type == "no_baseline":
        return -r * lp
    if loss_type == "reinforce_with_baseline":
        return -a * lp
    ratio = torch.exp(lp - old)
    if loss_type == "cispo":  # MiniMax-M1 eq. 4: the clipped ratio is a constant weight on REINFORCE
        return -torch.clamp(ratio, 1 - eps_low, 1 + eps_high).detach() * a * lp
    if loss_type == "gspo":  # GSPO-token, eqs. 13-14: s_i,t = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]
        rows = []
        for i in range(lp.shape[0]):
            n = int(mask[i].sum())
            s_i = math.exp(sum(float(lp[i, t] - old[i, t]) for t in range(lp.shape[1]) if mask[i, t]) / max(n, 1))
            rows.append(s_i * torch.exp(lp[i] - lp[i].detach()))
        ratio = torch.stack(rows)
    if loss_type == "grpo_no_clip":
        return -ratio * a
    return -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)


def naive_aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, grad_accum: int, constant: float,
                    n_tokens: float) -> torch.Tensor:
    """Sequence mean / constant / token-level reduction, row by row."""
    if mode == "token":
        return per_token[mask].sum() / n_tokens
    rows = []
    for i in range(per_token.shape[0]):
        total = per_token[i][mask[i]].sum()
        rows.append(total / max(int(mask[i].sum()), 1) if mode == "sequence_mean" else total / constant)
    return torch.stack(rows).mean() / grad_accum


def naive_loss(cfg: RunConfig, case: Case, old: torch.Tensor, lp: torch.Tensor, ent: torch.Tensor,
               ref: torch.Tensor | None) -> torch.Tensor:
    """The whole micro-batch loss from the formulas, on rows `case.index`."""
    g, i = cfg.grpo, case.index
    per_token = naive_pg(lp, old, case.batch.advantages[i], case.batch.raw_rewards[i], g.loss_type,
                         g.cliprange, g.cliprange_high or g.cliprange, case.batch.tokens.response_mask[i])
    if g.tis_cap is not None:
        weight = torch.exp(old - case.batch.rollout_log_probs[i]).detach()
        per_token = per_token * torch.where(weight > g.tis_cap, torch.full_like(weight, g.tis_cap), weight)
    if ref is not None and g.kl_coef > 0:
        per_token = per_token + g.kl_coef * (torch.exp(ref - lp) - (ref - lp) - 1)
    per_token = per_token - g.entropy_coef * ent
    return naive_aggregate(per_token, case.batch.tokens.response_mask[i], g.length_normalization,
                           g.gradient_accumulation_steps, float(cfg.rollout.max_tokens), case.n_tokens)


# ---- driving the real micro_step -----------------------------------------------------------------
class FakeLearner:
    """What `micro_step` uses of a `Learner`; the forward returns hand-made leaves (rows `index`)."""

    def __init__(self, log_probs: torch.Tensor, entropy: torch.Tensor, index: torch.Tensor) -> None:
        self.lp, self.ent, self.index = log_probs, entropy, index
        self.device = torch.device("cpu")
        self.accelerator = SimpleNamespace(num_processes=1)
        self.loss: torch.Tensor | None = None

    def log_probs(self, tokens: TokenBatch, return_token_entropy: bool = False,
                  temperature: float = 1.0) -> dict[str, torch.Tensor]:
        assert return_token_entropy and tokens.labels.shape == self.lp[self.index].shape and temperature == 1.0
        return {"log_probs": self.lp[self.index], "token_entropy": self.ent[self.index]}

    def backward(self, loss: torch.Tensor) -> None:
        self.loss = loss.detach()
        loss.backward()


class Case:
    """A random micro-batch: 4 rollouts of different lengths, rows (2, 0, 3) taken in that order."""

    def __init__(self, dtype: torch.dtype, seed: int = 0, off_policy: bool = True) -> None:
        gen = torch.Generator().manual_seed(seed)
        prompts = [[3] * n for n in (5, 3, 7, 4)]
        responses = [[4] * n for n in (6, 2, 4, 8)]
        tokens = pack_token_ids(prompts, responses, pad_id=1)
        shape = tokens.labels.shape

        def randn() -> torch.Tensor:
            return torch.randn(shape, generator=gen, dtype=torch.float64)

        self.lp = (-3 * torch.rand(shape, generator=gen, dtype=torch.float64) - 0.05).to(dtype)
        self.ent = (2 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)
        self.ref = (self.lp + 0.4 * randn()).to(dtype)
        old = (self.lp + 0.15 * randn()).to(dtype) if off_policy else None
        base = old if old is not None else self.lp
        rollout = torch.where(tokens.response_mask, base + 0.5 * randn(), 0.0).to(dtype)
        adv = torch.randn(4, generator=gen, dtype=torch.float64).to(dtype)
        raw = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=dtype)
        self.batch = RolloutBatch(tokens, raw, adv, rollout, old)
        self.index = torch.tensor([2, 0, 3])
        self.n_tokens = 2.0 * float(tokens.response_mask[self.index].sum())  # as if a 2nd micro-batch

    def old_for(self, lp: torch.Tensor) -> torch.Tensor:
        old = self.batch.old_log_probs
        return old[self.index] if old is not None else lp.detach()

    def run(self, cfg: RunConfig, monkeypatch: pytest.MonkeyPatch,
            with_ref: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """The real micro_step: (loss, ∂loss/∂lp, ∂loss/∂H) on rows `index`, in the case's dtype; metrics."""
        lp, ent = self.lp.clone().requires_grad_(), self.ent.clone().requires_grad_()
        learner = FakeLearner(lp, ent, self.index)
        monkeypatch.setattr(grpo, "_ref_log_probs", lambda model, mb, packed, temperature=1.0: self.ref[self.index])
        metrics = micro_step(learner, cfg, self.batch, self.index, self.n_tokens,
                             torch.nn.Identity() if with_ref else None)
        assert learner.loss is not None and lp.grad is not None
        g_ent = ent.grad if ent.grad is not None else torch.zeros_like(ent)  # None: no entropy term at all
        return learner.loss, lp.grad[self.index], g_ent[self.index], metrics

    def twin(self, cfg: RunConfig, with_ref: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The naive twin in float64 on the same values: (loss, ∂loss/∂lp, ∂loss/∂H) on rows `index`."""
        lp = self.lp[self.index].double().requires_grad_()
        ent = self.ent[self.index].double().requires_grad_()
        old = self.old_for(lp).double()
        loss = naive_loss(cfg, self.as_double(), old, lp, ent, self.ref[self.index].double() if with_ref else None)
        loss.backward()
        assert lp.grad is not None and ent.grad is not None
        return loss.detach(), lp.grad, ent.grad

    def as_double(self) -> Case:
        twin = object.__new__(Case)
        b = self.batch
        twin.batch = RolloutBatch(b.tokens, b.raw_rewards.double(), b.advantages.double(),
                                  b.rollout_log_probs.double(), None)
        twin.index, twin.n_tokens = self.index, self.n_tokens
        return twin

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.tokens.response_mask[self.index]

    def tis_ratio(self) -> torch.Tensor:
        """exp(old − rollout) on rows `index` (old = lp on-policy), float64."""
        return torch.exp(self.old_for(self.lp[self.index]).double() - self.batch.rollout_log_probs[self.index].double())

    def norm(self, cfg: RunConfig) -> torch.Tensor:
        """d(aggregate)/d(per-token loss), (k, s): the normaliser each token's loss is divided by."""
        g, mask = cfg.grpo, self.mask.double()
        k = mask.shape[0]
        if g.length_normalization == "token":
            return mask / self.n_tokens
        if g.length_normalization == "constant":
            return mask / (cfg.rollout.max_tokens * k * g.gradient_accumulation_steps)
        return mask / (mask.sum(-1, keepdim=True) * k * g.gradient_accumulation_steps)


_BASE: RunConfig | None = None


def make_cfg(**grpo_fields: object) -> RunConfig:
    global _BASE
    if _BASE is None:
        _BASE = load_config(TINY_CONFIG, ["rollout.engine=hf", "warmstart.steps=0", "rollout.max_tokens=16"])
    fields = {"tis_cap": None, "kl_coef": 0.0, "entropy_coef": 0.0, "cliprange": 0.2, **grpo_fields}
    return _BASE.model_copy(update={"grpo": _BASE.grpo.model_copy(update=fields)})


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


# ---- a tiny case by hand -------------------------------------------------------------------------
def test_hand_worked_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row, two response tokens, reinforce_with_baseline, A = 1, sequence mean, no accumulation;
    tis_cap 1.5, kl_coef 0.5, entropy_coef 0.1.

    lp = (−1, −2), rollout = (−1.5, −1), ref = (−1 + ln 2, −2), H = (1, 0.5):
      TIS w  = (min(e^0.5 = 1.6487, 1.5), e^−1) = (1.5, 0.367879)
      PG·w   = −A·lp·w = (1.5, 0.735759)
      k3     = (2 − ln 2 − 1, 0) = (0.306853, 0)
      ℓ      = PG·w + 0.5·k3 − 0.1·H = (1.553426, 0.685759);   loss = mean = 1.119593
      ∂/∂lp  = (−A·w + 0.5·(1 − e^{ref−lp})) / 2 = ((−1.5 − 0.5)/2, −0.367879/2) = (−1.0, −0.183940)
      ∂/∂H   = −0.1 / 2 = (−0.05, −0.05)
    """
    case = object.__new__(Case)
    tokens = pack_token_ids([[5]], [[6, 7]], pad_id=1)
    assert tokens.response_mask.tolist() == [[True, True]]
    d = torch.float64
    case.batch = RolloutBatch(tokens, torch.tensor([1.0], dtype=d), torch.tensor([1.0], dtype=d),
                              torch.tensor([[-1.5, -1.0]], dtype=d), None)
    case.lp = torch.tensor([[-1.0, -2.0]], dtype=d)
    case.ent = torch.tensor([[1.0, 0.5]], dtype=d)
    case.ref = torch.tensor([[-1.0 + math.log(2.0), -2.0]], dtype=d)
    case.index, case.n_tokens = torch.tensor([0]), 2.0
    cfg = make_cfg(loss_type="reinforce_with_baseline", length_normalization="sequence_mean",
                   gradient_accumulation_steps=1, tis_cap=1.5, kl_coef=0.5, entropy_coef=0.1)
    loss, g_lp, g_ent, metrics = case.run(cfg, monkeypatch)
    assert float(loss) == pytest.approx(1.119593, abs=1e-6)
    assert g_lp[0].tolist() == pytest.approx([-1.0, -0.183940], abs=1e-6)
    assert g_ent[0].tolist() == pytest.approx([-0.05, -0.05], abs=1e-12)
    assert metrics["train/kl"] == pytest.approx((1 - math.log(2.0)) / 2, abs=1e-12)


# ---- all terms together against the twin --------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_full_loss_matches_naive_twin(monkeypatch: pytest.MonkeyPatch, loss_type: str, mode: str,
                                      dtype: torch.dtype) -> None:
    """PG × TIS + KL − entropy, off-policy, every loss type and aggregation: value and both gradients."""
    case = Case(dtype)
    cfg = make_cfg(loss_type=loss_type, length_normalization=mode, tis_cap=1.3, kl_coef=0.2, entropy_coef=0.05)
    loss, g_lp, g_ent, metrics = case.run(cfg, monkeypatch)
    t_loss, t_lp, t_ent = case.twin(cfg)
    assert_close(loss, t_loss, dtype)
    assert_close(g_lp, t_lp, dtype)
    assert_close(g_ent, t_ent, dtype)
    assert metrics["train/loss"] == pytest.approx(float(t_loss) * cfg.grpo.gradient_accumulation_steps,
                                                  rel=TOL[dtype]["rtol"] * 10)
    # the test has power: dropping any one term (or flipping the entropy sign) moves some gradient entry
    # by > 1e-4, 100x the float32 atol (the smallest, entropy in "constant" mode, is 0.05 / 96 = 5.2e-4)
    for ablated in ({"tis_cap": None}, {"kl_coef": 0.0}, {"entropy_coef": 0.0}, {"entropy_coef": -0.05}):
        other = case.twin(cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update=ablated)}))
        assert float(torch.cat([(other[1] - t_lp).flatten(), (other[2] - t_ent).flatten()]).abs().max()) > 1e-4


# ---- TIS ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("off_policy", [False, True])
def test_tis_weight_multiplies_the_pg_gradient(monkeypatch: pytest.MonkeyPatch, off_policy: bool, mode: str,
                                               dtype: torch.dtype) -> None:
    """REINFORCE with baseline, TIS only: ∂loss/∂lp_t = −A · min(exp(old_t − rollout_t), cap) · norm_t.

    No derivative of the weight appears (it is detached), and on-policy ``old`` is ``lp`` itself."""
    case = Case(dtype, seed=1, off_policy=off_policy)
    cap = 1.3
    cfg = make_cfg(loss_type="reinforce_with_baseline", length_normalization=mode, tis_cap=cap)
    _, g_lp, g_ent, _ = case.run(cfg, monkeypatch, with_ref=False)
    ratio = case.tis_ratio()
    weight = torch.minimum(ratio, torch.full_like(ratio, cap))
    adv = case.batch.advantages[case.index].double()[:, None]
    assert_close(g_lp, -adv * weight * case.norm(cfg), dtype)
    assert_close(g_lp, case.twin(cfg, with_ref=False)[1], dtype)
    assert float(g_ent.abs().max()) == 0.0  # entropy_coef 0: no entropy term at all


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_tis_changes_the_gradient_exactly_where_the_cap_binds(monkeypatch: pytest.MonkeyPatch,
                                                              loss_type: str) -> None:
    """Same batch, cap 1.3 vs a cap that never binds vs no TIS (float64).

    Where exp(old − rollout) ≤ 1.3 the two capped runs agree; where it exceeds 1.3 the binding cap
    scales the token's gradient by 1.3 / ratio. Against no TIS every token's gradient is scaled by its
    weight, so deleting the TIS line is caught; KL and entropy (on here) are never weighted."""
    case = Case(torch.float64, seed=2)
    kw = {"loss_type": loss_type, "kl_coef": 0.2, "entropy_coef": 0.05}
    _, g_cap, e_cap, _ = case.run(make_cfg(tis_cap=1.3, **kw), monkeypatch)
    _, g_loose, e_loose, _ = case.run(make_cfg(tis_cap=1e9, **kw), monkeypatch)
    _, g_off, e_off, _ = case.run(make_cfg(**kw), monkeypatch)
    ratio, mask = case.tis_ratio(), case.mask
    binds = mask & (ratio > 1.3)
    assert 0 < int(binds.sum()) < int(mask.sum())  # the case exercises both sides of the cap
    torch.testing.assert_close(g_cap[mask & ~binds], g_loose[mask & ~binds], rtol=1e-12, atol=1e-12)
    kl_part = make_kl_grad(case, make_cfg(**kw))  # the same in all three runs; the rest is the PG part
    pg_cap, pg_loose, pg_off = g_cap - kl_part, g_loose - kl_part, g_off - kl_part
    torch.testing.assert_close(pg_cap[binds], pg_loose[binds] * 1.3 / ratio[binds], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pg_loose[mask], pg_off[mask] * ratio[mask], rtol=1e-10, atol=1e-12)
    assert float((pg_loose - pg_off).abs().max()) > 1e-3
    for e in (e_cap, e_loose):
        torch.testing.assert_close(e, e_off, rtol=0, atol=0)


def make_kl_grad(case: Case, cfg: RunConfig) -> torch.Tensor:
    """∂(kl_coef · k3)/∂lp after aggregation: kl_coef · (1 − exp(ref − lp)) · norm, float64."""
    lp, ref = case.lp[case.index].double(), case.ref[case.index].double()
    return cfg.grpo.kl_coef * (1 - torch.exp(ref - lp)) * case.norm(cfg)


# ---- entropy bonus -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_entropy_bonus_lowers_the_loss(monkeypatch: pytest.MonkeyPatch, mode: str, dtype: torch.dtype) -> None:
    """loss = PG − entropy_coef · H: raising H lowers the loss by exactly entropy_coef · Σ norm_t · ΔH_t,
    and ∂loss/∂H_t = −entropy_coef · norm_t < 0 on response tokens (0 elsewhere); the PG gradient is
    untouched by the bonus."""
    coef = 0.05
    case = Case(dtype, seed=3)
    cfg = make_cfg(loss_type="grpo_clip", length_normalization=mode, entropy_coef=coef, tis_cap=1.3)
    loss, g_lp, g_ent, metrics = case.run(cfg, monkeypatch, with_ref=False)
    norm = case.norm(cfg)
    assert_close(g_ent, -coef * norm, dtype)
    assert bool((g_ent[case.mask] < 0).all()) and float(g_ent[~case.mask].abs().max()) == 0.0
    assert_close(g_ent, case.twin(cfg, with_ref=False)[2], dtype)

    case.ent = case.ent + 0.25  # more entropy everywhere → lower loss
    higher, g_lp_higher, _, metrics_higher = case.run(cfg, monkeypatch, with_ref=False)
    assert float(higher) < float(loss)
    assert float(loss - higher) == pytest.approx(float(coef * 0.25 * norm.sum()), rel=1e-5, abs=1e-7)
    assert metrics_higher["train/entropy"] == pytest.approx(metrics["train/entropy"] + 0.25, rel=1e-6)
    assert_close(g_lp_higher, g_lp, dtype)
    no_bonus = case.run(make_cfg(loss_type="grpo_clip", length_normalization=mode, tis_cap=1.3), monkeypatch,
                        with_ref=False)
    assert_close(no_bonus[1], g_lp, dtype)


# ---- KL k3 ---------------------------------------------------------------------------------------
def test_k3_kl_per_token_by_hand() -> None:
    """k3 = exp(ref − lp) − (ref − lp) − 1 per token (computed here with `math`), ≥ 0, exactly 0 at
    ref == lp, and its gradient is 1 − exp(ref − lp) (zero at ref == lp, sign of lp − ref)."""
    gen = torch.Generator().manual_seed(4)
    lp = (-4 * torch.rand(3, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    ref = lp.detach() + torch.randn(3, 7, generator=gen, dtype=torch.float64)
    kl = k3_kl(lp, ref)
    expected = [[math.exp(r - p) - (r - p) - 1 for p, r in zip(prow, rrow, strict=True)]
                for prow, rrow in zip(lp.tolist(), ref.tolist(), strict=True)]
    torch.testing.assert_close(kl.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert bool((kl >= 0).all())
    kl.sum().backward()
    assert lp.grad is not None
    torch.testing.assert_close(lp.grad, 1 - torch.exp(ref - lp.detach()), rtol=1e-12, atol=1e-14)
    assert bool((torch.sign(lp.grad) == torch.sign(lp.detach() - ref)).all())

    same = lp.detach().clone().requires_grad_()
    at_ref = k3_kl(same, same.detach())
    at_ref.sum().backward()
    assert float(at_ref.detach().abs().max()) == 0.0 and same.grad is not None and float(same.grad.abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_kl_penalty_gradient_in_micro_step(monkeypatch: pytest.MonkeyPatch, mode: str, dtype: torch.dtype) -> None:
    """With PG off (zero advantages), ∂loss/∂lp = kl_coef · (1 − exp(ref − lp)) · norm — the KL term is
    added once, un-weighted by TIS; train/kl is its masked mean, ≥ 0; no reference model → no KL; a
    reference equal to the policy → zero loss and zero gradient."""
    case = Case(dtype, seed=5)
    case.batch.advantages = torch.zeros_like(case.batch.advantages)
    cfg = make_cfg(loss_type="grpo_clip", length_normalization=mode, kl_coef=0.3, tis_cap=1.3)
    loss, g_lp, _, metrics = case.run(cfg, monkeypatch)
    assert_close(g_lp, make_kl_grad(case, cfg), dtype)
    assert_close(g_lp, case.twin(cfg)[1], dtype)
    lp, ref, mask = case.lp[case.index].double(), case.ref[case.index].double(), case.mask
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    assert metrics["train/kl"] == pytest.approx(float(k3[mask].mean()), rel=1e-5)
    assert metrics["train/kl"] > 0 and float(loss) > 0

    loss_no_ref, g_no_ref, _, metrics_no_ref = case.run(cfg, monkeypatch, with_ref=False)
    assert float(loss_no_ref) == 0.0 and float(g_no_ref.abs().max()) == 0.0 and "train/kl" not in metrics_no_ref

    case.ref = case.lp.clone()
    loss_eq, g_eq, _, metrics_eq = case.run(cfg, monkeypatch)
    assert float(loss_eq) == 0.0 and float(g_eq.abs().max()) == 0.0 and metrics_eq["train/kl"] == 0.0


# ---- through the real model ---------------------------------------------------------------------
def test_real_model_gradient_matches_twin(tiny_qwen2_path: str, tmp_path: Path) -> None:
    """Tiny Qwen2, off-policy GRPO-Clip with TIS, KL to a perturbed frozen copy and the entropy bonus:
    the parameter gradient of `micro_step` equals that of the twin built from a plain forward pass
    (log_softmax, gather, −Σ p log p), per parameter to 1e-5 relative (other matmul shapes)."""
    cfg = load_config(TINY_CONFIG, [
        f"model.path={tiny_qwen2_path}", f"output_dir={tmp_path}", "rollout.engine=hf", "warmstart.steps=0",
        "rollout.max_tokens=8", "model.dtype=float32", "model.packing=false", "grpo.loss_type=grpo_clip",
        "grpo.length_normalization=sequence_mean", "grpo.gradient_accumulation_steps=2", "grpo.tis_cap=1.2",
        "grpo.kl_coef=0.5", "grpo.entropy_coef=0.1",
    ])
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(2, 900, (n,), generator=gen).tolist() for n in (5, 3, 7, 4)]
    responses = [torch.randint(2, 900, (n,), generator=gen).tolist() for n in (6, 2, 4, 8)]
    tokens = pack_token_ids(prompts, responses, pad_id=1)
    mask = tokens.response_mask

    def forward(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits.float()
        log_p = torch.log_softmax(logits, dim=-1)
        lp = log_p.gather(-1, tokens.labels[..., None]).squeeze(-1)
        return lp, -(log_p.exp() * log_p).sum(-1)

    ref_model = load_model(cfg.model, "cpu").eval()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        ref_lp = forward(ref_model)[0]
    reference = Learner(cfg.model, cfg.optim)
    with torch.no_grad():
        current = forward(reference.model)[0]
    old = torch.where(mask, current + 0.15 * torch.randn(current.shape, generator=gen), 0.0)
    rollout = torch.where(mask, old + 0.3 * torch.randn(current.shape, generator=gen), 0.0)
    batch = RolloutBatch(tokens, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.randn(4, generator=gen), rollout, old)

    learner = Learner(cfg.model, cfg.optim)
    micro_step(learner, cfg, batch, torch.arange(4), float(mask.sum()), ref_model)
    ours = [p.grad.clone() for p in learner.model.parameters()]

    lp, ent = forward(reference.model)
    g = cfg.grpo
    weight = torch.exp(old - rollout)
    assert bool(((weight > g.tis_cap) & mask).any()) and bool(((weight < g.tis_cap) & mask).any())
    per_token = naive_pg(lp, old, batch.advantages, batch.raw_rewards, g.loss_type, g.cliprange, g.cliprange, mask)
    per_token = per_token * weight.clamp(max=g.tis_cap)
    per_token = per_token + g.kl_coef * (torch.exp(ref_lp - lp) - (ref_lp - lp) - 1) - g.entropy_coef * ent
    naive_aggregate(per_token, mask, "sequence_mean", g.gradient_accumulation_steps, 8.0, 0.0).backward()
    for a, p in zip(ours, reference.model.parameters(), strict=True):
        assert p.grad is not None
        assert float((a - p.grad).norm()) <= 1e-5 * float(p.grad.norm()) + 1e-10
