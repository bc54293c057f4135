"""masked_mean / masked_normalize / aggregate_loss: hand values, naive loops, gradcheck, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from trainer.losses import LOSS_AGG_MODES, aggregate_loss, masked_mean, masked_normalize

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
M = torch.tensor([[1, 0], [1, 1]])


def test_masked_mean_hand_values() -> None:
    """x = [[1, 2], [3, 4]], m = [[1, 0], [1, 1]]:
    all: (1 + 3 + 4) / 3 = 8/3; dim=-1: [1/1, (3+4)/2] = [1, 3.5]; dim=0: [(1+3)/2, 4/1] = [2, 4]."""
    torch.testing.assert_close(masked_mean(X, M), torch.tensor(8.0 / 3.0))
    torch.testing.assert_close(masked_mean(X, M, dim=-1), torch.tensor([1.0, 3.5]))
    torch.testing.assert_close(masked_mean(X, M, dim=0), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(masked_mean(X, M.bool(), dim=-1), torch.tensor([1.0, 3.5]))


def test_masked_mean_of_an_empty_row() -> None:
    """m = [[0, 0], [1, 1]]: row 0 has nothing to average: NaN (0/0) by default, 0 with empty_is_zero
    (what sequence_mean and the GRPO metrics use); non-empty rows and the whole-tensor mean are unchanged:
    dim=-1 → [0, 3.5]; all → (3 + 4) / 2 = 3.5; an all-zero mask → NaN or 0."""
    m = torch.tensor([[0, 0], [1, 1]])
    plain = masked_mean(X, m, dim=-1)
    assert torch.isnan(plain[0]) and float(plain[1]) == 3.5
    torch.testing.assert_close(masked_mean(X, m, dim=-1, empty_is_zero=True), torch.tensor([0.0, 3.5]))
    torch.testing.assert_close(masked_mean(X, m, empty_is_zero=True), torch.tensor(3.5))
    assert torch.isnan(masked_mean(X, torch.zeros_like(m)))
    assert float(masked_mean(X, torch.zeros_like(m), empty_is_zero=True)) == 0.0


def test_masked_normalize_hand_values() -> None:
    """Same x, m, constant 2: all: 8/2 = 4; dim=-1: [1/2, 7/2]; dim=0: [4/2, 4/2]."""
    torch.testing.assert_close(masked_normalize(X, M, 2.0), torch.tensor(4.0))
    torch.testing.assert_close(masked_normalize(X, M, 2.0, dim=-1), torch.tensor([0.5, 3.5]))
    torch.testing.assert_close(masked_normalize(X, M.bool(), 2.0, dim=0), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(masked_normalize(X, M), torch.tensor(8.0))


def _naive_masked_mean(x: torch.Tensor, m: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None:
        vals = [float(v) for v, k in zip(x.flatten(), m.flatten(), strict=True) if k]
        return torch.tensor(sum(vals) / len(vals), dtype=torch.float64)
    xt, mt = x.movedim(dim, -1), m.movedim(dim, -1)
    out = torch.empty(xt.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*(range(s) for s in xt.shape[:-1])):
        vals = [float(v) for v, k in zip(xt[idx], mt[idx], strict=True) if k]
        out[idx] = sum(vals) / len(vals)
    return out


@pytest.mark.parametrize("dim", [None, 0, 1, 2, -1])
def test_masked_mean_matches_naive_loop(dim: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=gen)
    m = torch.rand(3, 4, 5, generator=gen) > 0.4
    m[..., 0] = True
    m[:, 0, :] = True
    m[0] = True
    got = masked_mean(x, m, dim=dim)
    torch.testing.assert_close(got.double(), _naive_masked_mean(x, m, dim), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", [None, 0, -1])
def test_masked_normalize_matches_naive(dim: int | None) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=gen)
    m = (torch.rand(4, 6, generator=gen) > 0.5).long()
    naive = torch.where(m.bool(), x, torch.zeros_like(x))
    naive = naive.sum() if dim is None else naive.sum(dim=dim)
    torch.testing.assert_close(masked_normalize(x, m, 3.5, dim=dim), naive / 3.5, rtol=1e-6, atol=1e-7)


def test_masked_mean_and_normalize_gradcheck() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    m = torch.rand(3, 5, generator=gen) > 0.3
    m[:, 0] = True
    assert torch.autograd.gradcheck(lambda t: masked_mean(t, m, dim=-1), (x,))
    assert torch.autograd.gradcheck(lambda t: masked_mean(t, m), (x,))
    assert torch.autograd.gradcheck(lambda t: masked_normalize(t, m, 7.0, dim=0), (x,))


L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
LM = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_aggregate_loss_hand_values() -> None:
    """L = [[1, 2, 3], [4, 5, 6]], m = [[1, 1, 0], [1, 0, 0]]:
    sequence_mean, G=2: per-seq means [1.5, 4] → mean 2.75 → /2 = 1.375.
    constant C=4, G=1: per-seq sums [3, 4] / 4 = [0.75, 1] → mean 0.875.
    token N=6, W=2: masked sum 1 + 2 + 4 = 7 → 7·2/6 = 7/3 (G ignored)."""
    torch.testing.assert_close(
        aggregate_loss(L, LM, "sequence_mean", gradient_accumulation_steps=2), torch.tensor(1.375)
    )
    torch.testing.assert_close(aggregate_loss(L, LM, "constant", normalize_constant=4.0), torch.tensor(0.875))
    torch.testing.assert_close(
        aggregate_loss(L, LM, "token", global_token_count=6, world_size=2, gradient_accumulation_steps=5),
        torch.tensor(7.0 / 3.0),
    )
    torch.testing.assert_close(
        aggregate_loss(L, LM.bool(), "token", global_token_count=torch.tensor(6), world_size=2),
        torch.tensor(7.0 / 3.0),
    )


def test_aggregate_loss_empty_sequence_contributes_zero() -> None:
    """Row 2 has no response token: sequence_mean = (1.5 + 4 + 0) / 3 = 11/6 (not NaN)."""
    loss = torch.cat([L, torch.tensor([[9.0, 9.0, 9.0]])])
    mask = torch.cat([LM, torch.zeros(1, 3, dtype=torch.long)])
    torch.testing.assert_close(aggregate_loss(loss, mask, "sequence_mean"), torch.tensor(11.0 / 6.0))


def _naive_aggregate(
    loss: torch.Tensor, mask: torch.Tensor, mode: str, g: int, c: float, n: float, w: int
) -> float:
    rows = []
    total = 0.0
    for i in range(loss.shape[0]):
        vals = [float(v) for v, k in zip(loss[i], mask[i], strict=True) if k]
        total += sum(vals)
        if mode == "sequence_mean":
            rows.append(sum(vals) / len(vals))
        elif mode == "constant":
            rows.append(sum(vals) / c)
    if mode == "token":
        return total * w / n
    return sum(rows) / len(rows) / g


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_loss_matches_naive_loop(mode: str) -> None:
    gen = torch.Generator().manual_seed(3)
    loss = torch.randn(5, 7, generator=gen)
    mask = torch.rand(5, 7, generator=gen) > 0.5
    mask[:, 0] = True
    got = aggregate_loss(
        loss,
        mask,
        mode,
        gradient_accumulation_steps=3,
        normalize_constant=7.0,
        global_token_count=40,
        world_size=4,
    )
    want = _naive_aggregate(loss, mask, mode, 3, 7.0, 40.0, 4)
    assert abs(float(got) - want) <= 1e-6 * abs(want)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_loss_gradcheck(mode: str) -> None:
    gen = torch.Generator().manual_seed(4)
    loss = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.rand(3, 4, generator=gen) > 0.4
    mask[:, 0] = True

    def fn(t: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(
            t, mask, mode, gradient_accumulation_steps=2, normalize_constant=4.0, global_token_count=9
        )

    assert torch.autograd.gradcheck(fn, (loss,))


def test_aggregate_loss_errors_name_missing_args() -> None:
    with pytest.raises(ValueError, match="normalize_constant"):
        aggregate_loss(L, LM, "constant")
    with pytest.raises(ValueError, match="global_token_count"):
        aggregate_loss(L, LM, "token")
    with pytest.raises(ValueError, match="sequence_mean"):
        aggregate_loss(L, LM, "mean")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        aggregate_loss(L, LM, "sequence_mean", gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="global_token_count"):
        aggregate_loss(L, LM, "token", global_token_count=0)
