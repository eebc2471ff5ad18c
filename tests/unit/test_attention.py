"""Segment attention and the shared-prompt layout give the padded path's numbers.

Real (small, seeded, float32) Llama, Mistral (GQA, a sliding window shorter than the
longest sequence) and Qwen2 (GQA 4:1, qkv bias) models; no mocks. Reference: the padded
batch (``collate_pairs``) through SDPA with its padding mask, log-probs summed per
sequence (``sequence_logps(average=False)``).

Tolerances (float32): summed log-probs rtol 1e-5 (relative: a sum over ~50 tokens is
~-170, and float32 kernels of other shapes differ in the 7th digit); averaged log-probs
atol 1e-5 (absolute); gradients of every parameter atol 1e-5 + rtol 1e-5. Each
comparison has a negative twin (a wrong p' position, a leak to the chosen answer, a
missing prompt) whose difference must exceed 1e-3 (100 x the tolerance), so the
tests can fail.
"""

import copy
import random

import pytest
import torch

from simpo_ray.attention import NAME, use_segment_attention, uses_segment_attention
from simpo_ray.collate import (IGNORE, collate_packed, collate_pairs, packed_model_inputs, pair_cost,
                               token_budget_batches)
from simpo_ray.logps import packed_sequence_logps, sequence_logps
from simpo_ray.segments import collate_shared, segment_kwargs, segment_spans, shared_attention_mask

B = 3


def _pairs(seed=0):
    """Three pairs of varied lengths; pair 2 has a one-token prompt (P[:-1] empty)."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(3, 299) for _ in range(n)]  # noqa: E731
    return [tok(5), tok(17), tok(1)], [tok(9), tok(3), tok(22)], [tok(14), tok(30), tok(2)]


def _build(kind):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, attention_dropout=0.0)
    torch.manual_seed({"llama": 0, "mistral": 1, "qwen2": 2}[kind])
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=4))
    elif kind == "mistral":  # GQA 4:2; the window (24) is shorter than the longest sequence (47)
        m = MistralForCausalLM(MistralConfig(**common, num_key_value_heads=2, sliding_window=24))
    else:
        m = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=1))
    m = m.float().train()  # dropout is 0; train() so gradient checkpointing would engage
    m.set_attn_implementation("sdpa")
    return m


@pytest.fixture(scope="module")
def models():
    return {k: _build(k) for k in ("llama", "mistral", "qwen2")}


def _padded(model, P, C, R):
    model.set_attn_implementation("sdpa")
    b = collate_pairs(P, C, R, pad_id=0)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, b["labels"], average=False), (b["labels"][:, 1:] != IGNORE).sum(1)


def _packed(model, b, how):
    """Summed log-probs of a packed batch (either layout): 'segments' through segment
    attention, 'dense' through SDPA with ``shared_attention_mask``."""
    if how == "segments":
        use_segment_attention(model)
        kwargs = segment_kwargs(b)
        mask = None
    else:
        model.set_attn_implementation("sdpa")
        group, branch = b.get("group_index"), b.get("branch")
        if group is None:  # plain packing: one group per sequence, one branch
            group, branch = b["sequence_index"], (b["sequence_index"] >= 0).long()
        mask = shared_attention_mask(group, branch, position_ids=b["position_ids"],
                                     sliding_window=getattr(model.config, "sliding_window", None))
        kwargs = {}
    # The model stays switched until the next call: under gradient checkpointing the
    # backward runs the attention again.
    logits = model(input_ids=b["input_ids"], attention_mask=mask, position_ids=b["position_ids"],
                   use_cache=False, **kwargs).logits
    return packed_sequence_logps(logits, b["labels"], b["sequence_index"], 2 * B, average=False)


def _loss(sums, counts):
    from simpo_ray.objective import step_loss
    from simpo_ray.sections import SimPOConfig

    return step_loss(SimPOConfig(beta=2.0, gamma_beta_ratio=0.5), sums, counts)[0]


def _grads(model, loss):
    params = list(model.parameters())
    return torch.autograd.grad(loss, params)


def _assert_same(got, ref, counts):
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got / counts, ref / counts, rtol=0, atol=1e-5)


def _assert_same_grads(g, g_ref):
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- layouts by hand
def test_shared_layout_by_hand():
    b = collate_shared([[1, 5, 6], [1]], [[10, 11], [12]], [[20], [21, 22]], pad_id=0, pad_to_multiple_of=1)
    # pair 0: P=1 5 6, C=10 11, p'=6, R=20 (7 tokens); pair 1: P=1, C=12, p'=1, R=21 22 (5)
    assert b["input_ids"].tolist() == [[1, 5, 6, 10, 11, 6, 20, 1, 12, 1, 21, 22]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1, 2]]
    assert b["labels"].tolist() == [[IGNORE] * 3 + [10, 11, IGNORE, 20] + [IGNORE, 12, IGNORE, 21, 22]]
    assert b["sequence_index"].tolist() == [[0] * 5 + [2] * 2 + [1] * 2 + [3] * 3]
    assert b["group_index"].tolist() == [[0] * 7 + [1] * 5]
    assert b["branch"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 1, 1, 2, 2, 2]]
    c = collate_shared([[1, 5, 6], [1]], [[10, 11], [12]], [[20], [21, 22]], pad_id=0, max_tokens=8)
    assert c["input_ids"].shape == (2, 8)  # one group per row, padded to 8
    assert c["sequence_index"][1].tolist() == [1, 1, 3, 3, 3, -1, -1, -1]
    assert c["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="non-empty prompt"):
        collate_shared([[]], [[1]], [[2]], pad_id=0)
    with pytest.raises(ValueError, match="empty completion"):
        collate_shared([[1]], [[1]], [[]], pad_id=0)


def test_shared_mask_and_spans_by_hand():
    b = collate_shared([[1, 5, 6]], [[10, 11]], [[20]], pad_id=0, pad_to_multiple_of=8)  # 7 tokens + 1 pad
    m = shared_attention_mask(b["group_index"], b["branch"])[0, 0].int().tolist()
    #          P0 P1 P2 C0 C1 p' R0 pad
    assert m == [[1, 0, 0, 0, 0, 0, 0, 0],   # P0
                 [1, 1, 0, 0, 0, 0, 0, 0],   # P1
                 [1, 1, 1, 0, 0, 0, 0, 0],   # P2 = P[-1]
                 [1, 1, 1, 1, 0, 0, 0, 0],   # C0
                 [1, 1, 1, 1, 1, 0, 0, 0],   # C1
                 [1, 1, 0, 0, 0, 1, 0, 0],   # p': P[:-1] and itself, as P2 sees P0, P1, P2
                 [1, 1, 0, 0, 0, 1, 1, 0],   # R0: never C, never P[-1] (p' stands for it)
                 [0, 0, 0, 0, 0, 0, 0, 1]]   # padding: itself
    spans, key_index = segment_spans(b)
    assert spans == ((0, 5, 0, 5, False), (5, 7, 5, 9, False), (7, 8, 9, 10, True))
    assert key_index == [0, 1, 2, 3, 4, 0, 1, 5, 6, 7]  # chosen [P, C]; rejected P[:-1] + [p', R]; pad
    kw = segment_kwargs(b)
    assert kw["segment_cu_q"].tolist() == [0, 5, 7, 8] and kw["segment_cu_k"].tolist() == [0, 5, 9, 10]
    assert (kw["segment_max_q"], kw["segment_max_k"]) == (5, 5)
    # plain packing: keys are the queries (no gather), rows never share a segment
    p = collate_packed([[1, 5], [1]], [[7, 2], [8, 2]], [[9, 9, 2], [3, 2]], pad_id=0, max_tokens=8)
    spans, key_index = segment_spans(p)
    assert key_index is None and all(q0 // 8 == (q1 - 1) // 8 for q0, q1, *_ in spans)
    assert sum(q1 - q0 for q0, q1, *_ in spans) == p["input_ids"].numel()
    assert [s[4] for s in spans].count(False) == 4


def test_pair_cost_budget_and_model_inputs():
    assert pair_cost(5, 3, 4) == 17 and pair_cost(5, 3, 4, share_prompt=True) == 13
    batch = {"prompt_ids": [[1] * 10, [1] * 10], "chosen_ids": [[2] * 5] * 2, "rejected_ids": [[3] * 5] * 2,
             "row": [0, 1]}
    assert [len(x["row"]) for x in token_budget_batches([batch], 45)] == [1, 1]  # 30 + 30 > 45
    assert [len(x["row"]) for x in token_budget_batches([batch], 45, share_prompt=True)] == [2]  # 21 + 21
    b, extra = packed_model_inputs(batch, 0, 64, flash=False, share_prompt=True)
    assert "branch" in b and extra["segment_key_index"] is not None and "cu_seq_lens_q" not in extra
    assert extra["num_sequences"] == 4 and extra["position_ids"].shape == b["input_ids"].shape
    b, extra = packed_model_inputs(batch, 0, 64, flash=True, share_prompt=False, segment_attention=True)
    assert b["input_ids"].shape[0] == 1 and extra["segment_key_index"] is None and "cu_seq_lens_q" not in extra
    b, extra = packed_model_inputs(batch, 0, 64, flash=True)  # today's flash layout, unchanged
    assert "cu_seq_lens_q" in extra and "segment_spans" not in extra
    with pytest.raises(ValueError, match="needs segment attention"):
        packed_model_inputs(batch, 0, 64, flash=False, share_prompt=True, segment_attention=False)


# ---------------------------------------------------------------- equal to the padded path
LAYOUTS = [("packed", "segments"), ("shared", "segments"), ("shared", "dense")]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("layout, how", LAYOUTS)
@pytest.mark.parametrize("max_tokens", [72, None])
def test_logps_and_gradients_equal_the_padded_path(models, kind, layout, how, max_tokens):
    model = models[kind]
    P, C, R = _pairs()
    collate = collate_packed if layout == "packed" else collate_shared
    b = collate(P, C, R, pad_id=0, max_tokens=max_tokens)
    ref, counts = _padded(model, P, C, R)
    g_ref = _grads(model, _loss(ref, counts))
    got = _packed(model, b, how)
    _assert_same(got.detach(), ref.detach(), counts)
    _assert_same_grads(_grads(model, _loss(got, counts)), g_ref)


def test_shared_slots_are_fewer(models):
    P, C, R = _pairs()
    shared = collate_shared(P, C, R, pad_id=0, pad_to_multiple_of=1)
    plain = collate_packed(P, C, R, pad_id=0, pad_to_multiple_of=1)
    assert plain["input_ids"].numel() - shared["input_ids"].numel() == sum(len(p) - 1 for p in P)


# ---------------------------------------------------------------- the tests can fail
def test_a_wrong_p_prime_position_is_caught(models):
    model = models["llama"]
    P, C, R = _pairs()
    ref, _ = _padded(model, P, C, R)
    b = collate_shared(P, C, R, pad_id=0)
    first_rejected = (b["branch"] == 2) & (b["labels"] == IGNORE)  # the p' tokens
    b["position_ids"] = b["position_ids"] + first_rejected.long()  # p' at p instead of p - 1
    with torch.no_grad():
        for how in ("segments", "dense"):
            assert (_packed(model, b, how) - ref)[B:].abs().max() > 1e-3


def test_a_leak_to_the_chosen_answer_or_a_lost_prompt_is_caught(models):
    model = models["mistral"]
    P, C, R = _pairs()
    ref, _ = _padded(model, P, C, R)
    b = collate_shared(P, C, R, pad_id=0)
    with torch.no_grad():
        leaky = dict(b, branch=b["branch"].masked_fill(b["branch"] == 1, 0))  # R may read C
        assert (_packed(model, leaky, "dense") - ref)[B:].abs().max() > 1e-3
        blind = dict(b, branch=b["branch"].masked_fill(b["branch"] == 0, 1))  # R never reads P[:-1]
        assert (_packed(model, blind, "segments") - ref)[B:].abs().max() > 1e-3
        # plain packing with two sequences' spans merged: one reads the other
        p = collate_packed(P, C, R, pad_id=0, max_tokens=None)
        merged = dict(p, sequence_index=p["sequence_index"].masked_fill(p["sequence_index"] == 1, 0))
        use_segment_attention(model)
        logits = model(input_ids=p["input_ids"], position_ids=p["position_ids"], use_cache=False,
                       **segment_kwargs(merged)).logits
        model.set_attn_implementation("sdpa")
        got = packed_sequence_logps(logits, p["labels"], p["sequence_index"], 2 * B, average=False)
        assert (got - ref)[1].abs() > 1e-3
        torch.testing.assert_close(got[2:], ref[2:], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- through the policy and the loss
@pytest.mark.parametrize("chunk_size", [0, 16])
def test_policy_logps_and_simpo_loss_equal_across_layouts(models, chunk_size):
    from simpo_ray.policy import PolicyLogps

    lm = copy.deepcopy(models["mistral"])
    policy = PolicyLogps(lm, chunk_size=chunk_size)
    params = list(policy.parameters())
    P, C, R = _pairs(seed=5)
    batch = {"prompt_ids": P, "chosen_ids": C, "rejected_ids": R}
    pad = collate_pairs(P, C, R, pad_id=0)
    sums_ref, counts_ref = policy(pad["input_ids"], pad["attention_mask"], pad["labels"])
    loss_ref = _loss(sums_ref, counts_ref)
    g_ref = torch.autograd.grad(loss_ref, params)
    use_segment_attention(policy)
    assert uses_segment_attention(policy)
    for share in (False, True):
        b, extra = packed_model_inputs(batch, 0, 80, flash=False, share_prompt=share, segment_attention=True)
        sums, counts = policy(b["input_ids"], None, b["labels"], sequence_index=b["sequence_index"], **extra)
        assert counts.tolist() == counts_ref.tolist()
        _assert_same(sums.detach(), sums_ref.detach(), counts)
        loss = _loss(sums, counts)
        assert abs(float(loss.detach()) - float(loss_ref.detach())) < 1e-6
        _assert_same_grads(torch.autograd.grad(loss, params), g_ref)


def test_gradient_checkpointing_is_unaffected(models):
    lm = copy.deepcopy(models["qwen2"])
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    P, C, R = _pairs(seed=6)
    ref, counts = _padded(lm, P, C, R)
    g_ref = _grads(lm, _loss(ref, counts))
    got = _packed(lm, collate_shared(P, C, R, pad_id=0, max_tokens=64), "segments")
    _assert_same(got.detach(), ref.detach(), counts)
    _assert_same_grads(_grads(lm, _loss(got, counts)), g_ref)


# ---------------------------------------------------------------- outside packed batches
def test_without_segments_the_model_runs_sdpa(models):
    lm = models["mistral"]
    P, C, R = _pairs(seed=7)
    b = collate_pairs(P, C, R, pad_id=0)
    ids = torch.tensor([P[1] + C[1]])
    with torch.no_grad():
        ref = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ref_plain = lm(input_ids=ids).logits  # no mask at all; 20 tokens < the window
        ref_long = lm(input_ids=torch.tensor([P[1] + R[1]])).logits  # 47 tokens > the window (24)
        gen_ref = lm.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        use_segment_attention(lm)
        try:
            assert lm.config._attn_implementation == NAME
            torch.testing.assert_close(lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                       ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(lm(input_ids=ids).logits, ref_plain, rtol=0, atol=1e-5)
            torch.testing.assert_close(lm(input_ids=torch.tensor([P[1] + R[1]])).logits, ref_long, rtol=0, atol=1e-5)
            assert lm.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).tolist() == gen_ref.tolist()
            p = collate_packed(P, C, R, pad_id=0)
            with pytest.raises(ValueError, match="without segment kwargs"):
                lm(input_ids=p["input_ids"], position_ids=p["position_ids"], use_cache=False)
        finally:
            lm.set_attn_implementation("sdpa")
