"""Micro-batch layouts (`trainer.logprobs`) against their naive twin, the padded forward.

Trimmed and packed log-probs, entropies and gradients equal the padded `get_response_log_probs` on every
real position, for the tiny GPT-2 (learned positions) and the tiny Qwen2 (rotary positions), under the
``sdpa`` and ``eager`` attention implementations; padding positions are exactly 0. Sorting the rows of an
optimizer batch by length leaves the accumulated GRPO gradient unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.data.batching import TokenBatch, pack_token_ids
from trainer.logprobs import forward_log_probs, get_response_log_probs, length_sorted_order, pack, trim

TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32 forward of a different tensor shape (other matmul blocking)


def hand_batch() -> TokenBatch:
    """Rows of 3, 5 and 2 tokens (prompt + response); after the shift, real input lengths 3, 4 and 2 (the
    last real token is an input whose label is padding)."""
    return pack_token_ids([[10, 11], [20, 21, 22], [30]], [[12], [23, 24], [31]], pad_id=0)


def test_pack_by_hand() -> None:
    """Packed row = the real input positions end to end: [10 11 12 | 20 21 22 23 | 30 31], positions
    [0 1 2 | 0 1 2 3 | 0 1], labels [11 12 0 | 21 22 23 24 | 31 0]; unpack puts values back where they came
    from and 0 elsewhere."""
    row = pack(hand_batch())
    assert row.input_ids.tolist() == [[10, 11, 12, 20, 21, 22, 23, 30, 31]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert row.labels.tolist() == [[11, 12, 0, 21, 22, 23, 24, 31, 0]]
    values = torch.arange(1.0, 10.0).unsqueeze(0)  # (1, 9)
    assert row.unpack(values).tolist() == [[1, 2, 3, 0], [4, 5, 6, 7], [8, 9, 0, 0]]


def test_trim_and_length_order_by_hand() -> None:
    tokens = hand_batch()
    wide = TokenBatch(*(torch.nn.functional.pad(t, (0, 3)) for t in (tokens.input_ids, tokens.labels,
                                                                      tokens.response_mask, tokens.attention_mask)))
    assert wide.input_ids.shape[1] == 7
    assert trim(wide).input_ids.shape[1] == 4  # the longest real row
    assert torch.equal(trim(wide).labels, tokens.labels)
    assert length_sorted_order(tokens, torch.tensor([0, 1, 2])).tolist() == [1, 0, 2]  # lengths 3, 4, 2
    assert length_sorted_order(tokens, torch.tensor([2, 0])).tolist() == [0, 2]


def random_batch(seed: int, n: int = 6) -> TokenBatch:
    """Rows of very different lengths (2..40 tokens), right-padded, plus 5 extra all-padding columns."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 900, (int(torch.randint(1, 15, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(n)]
    responses = [torch.randint(2, 900, (int(torch.randint(1, 26, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(n)]
    tokens = pack_token_ids(prompts, responses, pad_id=1)
    return TokenBatch(*(torch.nn.functional.pad(t, (0, 5), value=v) for t, v in (
        (tokens.input_ids, 1), (tokens.labels, 1), (tokens.response_mask, False), (tokens.attention_mask, 0))))


def load(path: str, attn: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-qwen2"])
@pytest.mark.parametrize("packed", [False, True])
def test_layouts_match_padded_forward(tiny_dir: dict[str, Path], arch: str, attn: str, packed: bool) -> None:
    model = load(str(tiny_dir[arch]), attn)
    tokens = random_batch(seed=len(arch) + packed)
    real = tokens.attention_mask.bool()
    with torch.no_grad():
        want = get_response_log_probs(model, tokens.input_ids, tokens.labels, True,
                                      attention_mask=tokens.attention_mask)
        got = forward_log_probs(model, tokens, return_token_entropy=True, packed=packed)
    for key in ("log_probs", "token_entropy"):
        assert got[key].shape == tokens.labels.shape
        torch.testing.assert_close(got[key][real], want[key][real], **TOL)
        assert torch.all(got[key][~real] == 0)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-qwen2"])
@pytest.mark.parametrize("packed", [False, True])
def test_layout_gradients_match_padded(tiny_dir: dict[str, Path], arch: str, packed: bool) -> None:
    """d/dθ of Σ_response log p (plus entropy) is the same in every layout."""
    tokens = random_batch(seed=7)
    mask = tokens.response_mask.float()
    grads = []
    for layout in ("padded", "packed" if packed else "trimmed"):
        model = load(str(tiny_dir[arch]), "sdpa")
        if layout == "padded":
            out = get_response_log_probs(model, tokens.input_ids, tokens.labels, True,
                                         attention_mask=tokens.attention_mask)
        else:
            out = forward_log_probs(model, tokens, return_token_entropy=True, packed=packed)
        ((out["log_probs"] + 0.1 * out["token_entropy"]) * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    want, got = grads
    assert float(want.norm()) > 0
    assert float((got - want).norm() / want.norm()) <= 1e-5



def long_prompt_batch(seed: int) -> TokenBatch:
    """`random_batch` with prompts of 4..14 tokens, so every row's response starts after column 2."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 900, (int(torch.randint(4, 15, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(6)]
    responses = [torch.randint(2, 900, (int(torch.randint(1, 26, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(6)]
    return pack_token_ids(prompts, responses, pad_id=1)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-qwen2"])
@pytest.mark.parametrize("packed", [False, True])
def test_response_only_runs_the_head_on_the_response(tiny_dir: dict[str, Path], arch: str, packed: bool) -> None:
    """``response_only``: log-probs, entropies and their gradient equal the padded twin's on response positions,
    0 elsewhere, and the LM head ran on the response columns only (packed: exactly the response tokens;
    trimmed: the columns from the first response label on)."""
    tokens = long_prompt_batch(seed=len(arch) + packed)
    mask = tokens.response_mask.bool()
    grads, head_rows = [], []
    for response_only in (False, True):
        model = load(str(tiny_dir[arch]), "sdpa")
        model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: head_rows.append(args[0].shape[0] * args[0].shape[1]))
        if response_only:
            got = forward_log_probs(model, tokens, return_token_entropy=True, packed=packed, response_only=True)
        else:
            got = get_response_log_probs(model, tokens.input_ids, tokens.labels, True,
                                         attention_mask=tokens.attention_mask)
            want = got
        ((got["log_probs"] + 0.1 * got["token_entropy"]) * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    for key in ("log_probs", "token_entropy"):
        torch.testing.assert_close(got[key][mask], want[key][mask].detach(), **TOL)
        assert torch.all(got[key][~mask] == 0)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) <= 1e-5
    first = int(mask.any(dim=0).nonzero()[0])
    assert first >= 3
    expected = int(mask.sum()) if packed else len(tokens) * (int(tokens.attention_mask.sum(-1).max()) - first)
    assert head_rows == [tokens.input_ids.numel(), expected]


def test_response_only_without_logits_to_keep(tiny_qwen2_path: str) -> None:
    """A model whose forward does not take ``logits_to_keep`` is scored whole, then masked: same values."""

    class Plain(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache)

    model = load(tiny_qwen2_path, "sdpa")
    tokens = long_prompt_batch(seed=3)
    mask = tokens.response_mask.bool()
    with torch.no_grad():
        for packed in (False, True):
            want = forward_log_probs(model, tokens, packed=packed, response_only=True)["log_probs"]
            got = forward_log_probs(Plain(model), tokens, packed=packed, response_only=True)["log_probs"]
            torch.testing.assert_close(got[mask], want[mask], **TOL)
            assert torch.all(got[~mask] == 0)


@pytest.mark.gpu
def test_packed_matches_padded_on_cuda(tiny_qwen2_path: str) -> None:
    """The same equality on the GPU's kernels (fp32, sdpa)."""
    model = load(tiny_qwen2_path, "sdpa").cuda()
    tokens = random_batch(seed=11).to("cuda")
    real = tokens.attention_mask.bool()
    with torch.no_grad():
        want = get_response_log_probs(model, tokens.input_ids, tokens.labels, attention_mask=tokens.attention_mask)
        got = forward_log_probs(model, tokens, packed=True)
    torch.testing.assert_close(got["log_probs"][real], want["log_probs"][real], **TOL)
