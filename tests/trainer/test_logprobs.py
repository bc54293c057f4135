"""compute_entropy and the chunked log-prob path vs their naive twins (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from cs336_adapters import compute_entropy
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.data.tokenization import tokenize_prompt_and_output
from trainer.logprobs import chunked_label_log_probs, get_response_log_probs, sequence_log_probs


def naive_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The one-liner the chunked path must equal."""
    return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_path: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()


@pytest.fixture(scope="module")
def batch(tiny_gpt2_path: str) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    return tokenize_prompt_and_output(
        ["What is 12 * 3?", "Tom has 5 apples."],
        [" <answer> 36 </answer>", " He buys 7 more apples. How many does Tom have now? 12"],
        tok,
    )


# ---- compute_entropy -------------------------------------------------------------------------------


def test_entropy_hand_values() -> None:
    """uniform over 4 → log 4 = 1.386294; [1e4, 1e4, -1e4] → log 2 = 0.693147; [1e4, 0, 0] → 0;
    [0, ln 3] → p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335."""
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0, 0.0],
                [1e4, 1e4, -1e4, -1e4],
                [1e4, 0.0, 0.0, -1e4],
                [0.0, math.log(3.0), -1e4, -1e4],
            ],
        ]
    )
    want = torch.tensor([[math.log(4.0), math.log(2.0), 0.0, 0.562335]])
    got = compute_entropy(logits)
    assert got.shape == (1, 4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_entropy_matches_naive_and_is_stable() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=gen) * 3
    naive = torch.distributions.Categorical(logits=logits.double()).entropy()
    torch.testing.assert_close(compute_entropy(logits).double(), naive, rtol=1e-6, atol=1e-6)
    big = torch.randn(2, 4, 50, generator=gen) * 1e4
    got = compute_entropy(big)
    assert torch.isfinite(got).all()
    naive_big = torch.distributions.Categorical(logits=big.double()).entropy()
    torch.testing.assert_close(got.double(), naive_big, rtol=1e-5, atol=1e-6)


def test_entropy_gradcheck() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(compute_entropy, (logits,))


# ---- chunked_label_log_probs -------------------------------------------------------------------------


def test_chunked_hand_values() -> None:
    """logits [0, ln 3]: p = (1/4, 3/4), so log p(label 1) = ln 0.75 and log p(label 0) = ln 0.25."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[1, 0]])
    got, ent = chunked_label_log_probs(logits, labels, return_token_entropy=True, chunk_tokens=1)
    torch.testing.assert_close(got, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    assert ent is not None
    torch.testing.assert_close(ent, torch.tensor([[0.562335, 0.562335]]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 7, 10_000])
def test_chunked_matches_naive_values_and_grads(chunk: int) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 7, 40, generator=gen) * 5).requires_grad_(True)
    labels = torch.randint(0, 40, (3, 7), generator=gen)
    weights = torch.randn(3, 7, generator=gen)
    got, ent = chunked_label_log_probs(logits, labels, return_token_entropy=True, chunk_tokens=chunk)
    want = naive_log_probs(logits, labels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert ent is not None
    torch.testing.assert_close(ent, compute_entropy(logits), rtol=1e-6, atol=1e-6)
    (g_got,) = torch.autograd.grad((got * weights).sum() + ent.sum(), logits)
    (g_want,) = torch.autograd.grad((want * weights).sum() + compute_entropy(logits).sum(), logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-6)


def test_chunked_gradcheck() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(
        lambda z: chunked_label_log_probs(z, labels, chunk_tokens=2)[0], (logits,)
    )


def test_chunked_entropy_gradcheck() -> None:
    """The entropy's closed-form gradient −p ⊙ (log p + H), together with the log-prob's, against finite
    differences (float64)."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=gen)
    weights = torch.randn(2, 3, dtype=torch.float64, generator=gen)

    def f(z: torch.Tensor) -> torch.Tensor:
        lp, ent = chunked_label_log_probs(z, labels, return_token_entropy=True, chunk_tokens=4)
        assert ent is not None
        return lp * weights + ent

    assert torch.autograd.gradcheck(f, (logits,))


def test_chunked_gradient_of_one_output_alone() -> None:
    """A loss of the log-probs only (the entropy computed as a metric) or of the entropy only: each gradient
    equals the naive one (the unused output's gradient is skipped, not taken as zero work)."""
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(2, 5, 30, generator=gen) * 3).requires_grad_(True)
    labels = torch.randint(0, 30, (2, 5), generator=gen)
    lp, ent = chunked_label_log_probs(logits, labels, return_token_entropy=True, chunk_tokens=4)
    assert ent is not None
    (g_lp,) = torch.autograd.grad(lp.sum(), logits, retain_graph=True)
    (g_ent,) = torch.autograd.grad(ent.sum(), logits)
    torch.testing.assert_close(g_lp, torch.autograd.grad(naive_log_probs(logits, labels).sum(), logits)[0],
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ent, torch.autograd.grad(compute_entropy(logits).sum(), logits)[0],
                               rtol=1e-6, atol=1e-6)


def test_chunked_saves_only_the_logits() -> None:
    """Autograd keeps nothing of the full-vocabulary fp32 work: the tensors saved for backward are the
    logits (bf16 here), the labels and two fp32 numbers per token (row max and logsumexp), with or without
    the entropy. (Before, the fp32 upcast of every chunk was kept: 4× the bf16 logits, 12× with the
    entropy.)"""
    logits = torch.randn(4, 64, 1000, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 64))
    for with_entropy in (False, True):
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, seen: dict[int, int] = storages) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp, ent = chunked_label_log_probs(logits, labels, return_token_entropy=with_entropy, chunk_tokens=32)
        assert sum(storages.values()) == logits.numel() * 2 + labels.numel() * 8 + 2 * labels.numel() * 4
        (lp.sum() + (ent.sum() if ent is not None else 0)).backward()  # and backward still works
        assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_chunked_entropy_with_minus_inf_logits() -> None:
    """[0, 0, −inf] through the chunked path: H = log 2, log p(label 0) = −log 2, finite gradients."""
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    lp, ent = chunked_label_log_probs(logits, torch.tensor([[0]]), return_token_entropy=True)
    assert ent is not None
    torch.testing.assert_close(ent, torch.tensor([[math.log(2.0)]]))
    torch.testing.assert_close(lp, torch.tensor([[-math.log(2.0)]]))
    (lp + ent).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_chunked_bf16_logits_upcast_per_chunk() -> None:
    """bf16 logits: each chunk is upcast to fp32, equal to the naive fp32 log-softmax of the same values."""
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 6, 30, generator=gen) * 4).bfloat16()
    labels = torch.randint(0, 30, (2, 6), generator=gen)
    got, _ = chunked_label_log_probs(logits, labels, chunk_tokens=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive_log_probs(logits, labels), rtol=1e-6, atol=1e-6)


def test_chunked_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="disagree"):
        chunked_label_log_probs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


# ---- get_response_log_probs on a real tiny model ---------------------------------------------------


def test_get_response_log_probs_matches_naive(gpt2: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    out = get_response_log_probs(gpt2, batch["input_ids"], batch["labels"], True, chunk_tokens=5)
    logits = gpt2(input_ids=batch["input_ids"]).logits
    assert out["log_probs"].shape == batch["labels"].shape
    torch.testing.assert_close(
        out["log_probs"], naive_log_probs(logits, batch["labels"]), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(out["token_entropy"], compute_entropy(logits), rtol=1e-5, atol=1e-5)
    assert "token_entropy" not in get_response_log_probs(gpt2, batch["input_ids"], batch["labels"])


def test_get_response_log_probs_grads_match_naive(
    gpt2: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    mask = batch["response_mask"].float()
    params = [p for p in gpt2.parameters() if p.requires_grad]
    got = get_response_log_probs(gpt2, batch["input_ids"], batch["labels"], chunk_tokens=4)["log_probs"]
    g_got = torch.autograd.grad((got * mask).sum(), params)
    naive = naive_log_probs(gpt2(input_ids=batch["input_ids"]).logits, batch["labels"])
    g_want = torch.autograd.grad((naive * mask).sum(), params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_temperature_scores_the_sampling_distribution(gpt2: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Naive twin at temperature 0.7: log_softmax(logits / 0.7) gathered, its entropy, and the parameter
    gradients (the in-place division must not break autograd); temperature 1 leaves the model's own.
    Float32 outputs: values within 1e-5; each parameter's gradient within 1e-5 of its norm (elementwise,
    the entropy term's larger terms leave ~2e-6 of summation-order noise on single entries)."""
    mask = batch["response_mask"].float()
    params = [p for p in gpt2.parameters() if p.requires_grad]
    got = get_response_log_probs(gpt2, batch["input_ids"], batch["labels"], True, chunk_tokens=4, temperature=0.7)
    g_got = torch.autograd.grad(((got["log_probs"] + got["token_entropy"]) * mask).sum(), params)
    logits = gpt2(input_ids=batch["input_ids"]).logits / 0.7
    naive, naive_entropy = naive_log_probs(logits, batch["labels"]), compute_entropy(logits)
    g_want = torch.autograd.grad(((naive + naive_entropy) * mask).sum(), params)
    torch.testing.assert_close(got["log_probs"], naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["token_entropy"], naive_entropy, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_want, strict=True):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-12
    plain = get_response_log_probs(gpt2, batch["input_ids"], batch["labels"])["log_probs"]
    assert (plain - got["log_probs"]).abs().max() > 1e-2  # the temperature really changed the scores
    with pytest.raises(ValueError, match="temperature must be > 0"):
        get_response_log_probs(gpt2, batch["input_ids"], batch["labels"], temperature=0.0)


def test_attention_mask_right_padding(gpt2: torch.nn.Module, tiny_gpt2_path: str) -> None:
    """With right padding + attention mask, log-probs at real positions equal the unpadded sequence's."""
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    short = tok.encode("Each box holds 4 cards.", add_special_tokens=False)
    long = tok.encode("Each box holds 4 cards. Ben has 3 boxes. How many cards?", add_special_tokens=False)
    pad = [tok.pad_token_id] * (len(long) - len(short))
    ids = torch.tensor([short + pad, long])
    attn = torch.tensor([[1] * len(short) + [0] * len(pad), [1] * len(long)])
    out = get_response_log_probs(gpt2, ids[:, :-1], ids[:, 1:], attention_mask=attn[:, :-1])["log_probs"]
    alone = get_response_log_probs(gpt2, ids[:1, : len(short) - 1], ids[:1, 1 : len(short)])["log_probs"]
    torch.testing.assert_close(out[:1, : len(short) - 1], alone, rtol=1e-5, atol=1e-5)


def test_sequence_log_probs_is_masked_sum(gpt2: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    per_token = get_response_log_probs(gpt2, batch["input_ids"], batch["labels"])["log_probs"]
    want = torch.stack([per_token[i][batch["response_mask"][i]].sum() for i in range(per_token.shape[0])])
    got = sequence_log_probs(
        gpt2, batch["input_ids"], batch["labels"], batch["response_mask"], chunk_tokens=3
    )
    assert got.shape == (2,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_chunked_stable_at_large_logits() -> None:
    """Logits of magnitude 1e4: equal to a float64 log-softmax of the same float32 values; labels that are
    the argmax (log p ≈ −log(#ties)) are exact to 1e-6, not to float32 spacing at 1e4 (~1e-3)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 30, generator=gen) * 1e4
    logits[0, 0, :2] = 1e5  # two-way tie far above the rest: log p = −log 2
    labels = torch.randint(0, 30, (2, 5), generator=gen)
    labels[0, 0] = 0
    labels[1] = logits[1].argmax(-1)
    got, ent = chunked_label_log_probs(logits, labels, return_token_entropy=True, chunk_tokens=3)
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert abs(float(got[0, 0]) + math.log(2.0)) < 1e-6
    assert ent is not None and torch.isfinite(ent).all()


def test_entropy_with_minus_inf_logits() -> None:
    """[0, 0, −inf]: the masked-out token contributes 0 → H = log 2, finite gradient."""
    logits = torch.tensor([[0.0, 0.0, float("-inf")]], requires_grad=True)
    h = compute_entropy(logits)
    torch.testing.assert_close(h, torch.tensor([math.log(2.0)]))
    h.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_chunked_compute_dtype_float64() -> None:
    """fp32 logits, compute_dtype=float64: equal to a float64 log-softmax of the same values to 1e-12."""
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 9, 40, generator=gen) * 5
    labels = torch.randint(0, 40, (2, 9), generator=gen)
    got, _ = chunked_label_log_probs(logits, labels, chunk_tokens=4, compute_dtype=torch.float64)
    assert got.dtype == torch.float64
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
