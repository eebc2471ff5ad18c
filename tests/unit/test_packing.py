"""Padding-free packing gives the padded path's numbers: per-sequence log-probs from
packed rows (pure, on random logits), and the SimPO loss and its gradient from a real
forward of the tiny Llama model, padded vs packed, in float32 to 1e-5."""

import dataclasses
import random

import pytest
import torch

from simpo_ray.collate import collate_packed, collate_pairs, flatten_packed, packed_attention_mask
from simpo_ray.logps import (packed_chunked_sequence_logps, packed_sequence_logps,
                             packed_token_counts, sequence_logps, token_counts)
from simpo_ray.losses import simpo_loss


def _pairs(n, seed=0, vocab=(6, 262)):
    """Random pairs shaped like the tiny tokenizer's: BOS-led prompts, EOS-closed answers,
    long-tailed rejected answers."""
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(*vocab) for _ in range(k)]  # noqa: E731
    P = [[1] + tok(rng.randint(1, 24)) for _ in range(n)]
    C = [tok(rng.randint(1, 30)) + [2] for _ in range(n)]
    R = [tok(int(min(90, rng.lognormvariate(3, 0.8)))) + [2] for _ in range(n)]  # <= 117 tokens with prompt
    return P, C, R


def _place(padded_batch, packed_batch, per_token):
    """Put the same per-token values into the padded (2B, T, V) and packed (R, L, V) layouts."""
    V = per_token[0].shape[-1]
    a = torch.randn(*padded_batch["input_ids"].shape, V, dtype=torch.float64) * 50  # junk on padding
    b = torch.randn(*packed_batch["input_ids"].shape, V, dtype=torch.float64) * 50
    for k, vals in enumerate(per_token):
        a[k, : len(vals)] = vals
        b[packed_batch["sequence_index"] == k] = vals
    return a, b


@pytest.mark.parametrize("max_tokens", [120, 200, None])
def test_packed_logps_equal_padded_logps(max_tokens):
    P, C, R = _pairs(6)
    padded = collate_pairs(P, C, R, pad_id=0)
    packed = collate_packed(P, C, R, pad_id=0, max_tokens=max_tokens)
    n = padded["input_ids"].shape[0]
    lengths = padded["attention_mask"].sum(1).tolist()
    g = torch.Generator().manual_seed(0)
    vals = [torch.randn(t, 11, generator=g, dtype=torch.float64) * 3 for t in lengths]
    a, b = _place(padded, packed, vals)
    labels_pad, labels_pack = padded["labels"].clamp(max=10), packed["labels"].clamp(max=10)
    labels_pad[padded["labels"] == -100] = -100
    labels_pack[packed["labels"] == -100] = -100
    for average in (True, False):
        ref = sequence_logps(a, labels_pad, average=average)
        got = packed_sequence_logps(b, labels_pack, packed["sequence_index"], n, average=average)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert packed_token_counts(labels_pack, packed["sequence_index"], n).tolist() == token_counts(labels_pad).tolist()


def test_packed_chunked_head_equals_plain_logits_and_gradients():
    P, C, R = _pairs(4, seed=1)
    packed = collate_packed(P, C, R, pad_id=0, max_tokens=96)
    g = torch.Generator().manual_seed(1)
    V, H = 300, 16
    hidden = torch.randn(*packed["input_ids"].shape, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    seq, lab = packed["sequence_index"], packed["labels"]
    ref = packed_sequence_logps(hidden @ weight.T, lab, seq, 8)
    got = packed_chunked_sequence_logps(hidden, weight, lab, seq, 8, chunk_size=7)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    w = torch.randn(8, dtype=torch.float64, generator=g)
    gh_ref, gw_ref = torch.autograd.grad((ref * w).sum(), (hidden, weight))
    gh, gw = torch.autograd.grad((got * w).sum(), (hidden, weight))
    torch.testing.assert_close(gh, gh_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=1e-10)
    # one row, as for flash-attn varlen, gives the same
    flat = flatten_packed(packed)
    flat_hidden = hidden.detach().reshape(1, -1, H)
    torch.testing.assert_close(
        packed_chunked_sequence_logps(flat_hidden, weight.detach(), flat["labels"], flat["sequence_index"], 8),
        ref.detach(), rtol=0, atol=1e-10)


def test_packed_logps_refuse_bad_input():
    b = collate_packed([[1]], [[4, 2]], [[5, 2]], pad_id=0, max_tokens=None)
    logits = torch.randn(*b["input_ids"].shape, 8)
    with pytest.raises(ValueError, match="no completion tokens"):
        packed_sequence_logps(logits, b["labels"], b["sequence_index"], 3)  # sequence 2 does not exist
    with pytest.raises(ValueError, match="sequence_index"):
        packed_sequence_logps(logits, b["labels"], b["sequence_index"], 1)
    with pytest.raises(ValueError, match="non-empty prompt"):
        collate_packed([[]], [[4, 2]], [[5, 2]], pad_id=0)


# ---------------------------------------------------------------- the tiny model, padded vs packed
@pytest.fixture(scope="module")
def model():
    from simpo_ray.config import TinyModelConfig
    from simpo_ray.tiny import build_model

    m = build_model(dataclasses.asdict(TinyModelConfig())).float()
    m.config.use_cache = False
    return m


def _padded_logps(model, P, C, R):
    b = collate_pairs(P, C, R, pad_id=0)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, b["labels"])


def _packed_logps(model, P, C, R, max_tokens, how):
    b = collate_packed(P, C, R, pad_id=0, max_tokens=max_tokens)
    if how == "flat":  # the flash-attn varlen layout, here through SDPA and position_ids
        b = flatten_packed(b)
    kwargs = {"position_ids": b["position_ids"], "use_cache": False}
    if how == "mask":  # an explicit block-diagonal mask (bool for SDPA, additive for eager)
        dtype = None if model.config._attn_implementation == "sdpa" else torch.float32
        kwargs["attention_mask"] = packed_attention_mask(b["sequence_index"], dtype)
    else:  # attention_mask=None: transformers finds the sequences from position_ids
        kwargs["attention_mask"] = None
    logits = model(input_ids=b["input_ids"], **kwargs).logits
    return packed_sequence_logps(logits, b["labels"], b["sequence_index"], 2 * len(P))


def _loss(logps):
    n = logps.shape[0] // 2
    return simpo_loss(logps[:n], logps[n:], beta=2.0, gamma_beta_ratio=0.5)[0].mean()


@pytest.mark.parametrize("attn, how, max_tokens", [
    ("sdpa", "position_ids", 128), ("sdpa", "mask", 128), ("sdpa", "flat", 128),
    ("sdpa", "position_ids", None), ("eager", "mask", 160), ("eager", "position_ids", 96)])
def test_same_loss_as_the_padded_path_fp32(model, attn, how, max_tokens):
    model.set_attn_implementation(attn)
    P, C, R = _pairs(5, seed=2)
    with torch.no_grad():
        ref = _padded_logps(model, P, C, R)
        got = _packed_logps(model, P, C, R, max_tokens, how)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert abs(float(_loss(got)) - float(_loss(ref))) < 1e-5


def test_same_gradient_as_the_padded_path(model):
    model.set_attn_implementation("sdpa")
    P, C, R = _pairs(4, seed=3)
    params = [p for p in model.parameters()]
    g_ref = torch.autograd.grad(_loss(_padded_logps(model, P, C, R)), params)
    g = torch.autograd.grad(_loss(_packed_logps(model, P, C, R, 128, "position_ids")), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_attention_across_sequences_and_the_test_can_fail(model):
    model.set_attn_implementation("sdpa")
    P, C, R = _pairs(3, seed=4)
    with torch.no_grad():
        base = _packed_logps(model, P, C, R, None, "position_ids")  # all six in one row
        P2 = [P[0][:1] + [(t + 7) % 250 + 6 for t in P[0][1:]]] + P[1:]  # change pair 0's prompt
        moved = _packed_logps(model, P2, C, R, None, "position_ids")
        # one plain causal row (no restart, no mask): sequences see each other
        b = collate_packed(P, C, R, pad_id=0, max_tokens=None)
        leaky = packed_sequence_logps(model(input_ids=b["input_ids"], use_cache=False).logits, b["labels"],
                                      b["sequence_index"], 6)
    others = [1, 2, 4, 5]  # every sequence but pair 0's chosen (0) and rejected (3)
    torch.testing.assert_close(moved[others], base[others], rtol=0, atol=1e-6)
    assert (moved[[0, 3]] - base[[0, 3]]).abs().min() > 1e-4
    assert (leaky - base).abs().max() > 1e-3
