"""simpo_ray.logps: hand values, masking, and chunked == plain (values and gradients)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simpo_ray.logps import chunked_sequence_logps, sequence_logps, token_counts
import simpo_ray.logps as logps_mod

F64 = torch.float64
LN2, LN3 = math.log(2.0), math.log(3.0)


def hand_example():
    """V = 3, T = 3, two rows. Position t predicts labels[t + 1]; the last position
    predicts nothing.

    row 0: labels (-100, 2, 1)
      t = 0 logits (0, 0, 0):       log p(2) = 0 - log 3                  = -ln 3
      t = 1 logits (0, ln 2, 0):    log p(1) = ln 2 - log(1 + 2 + 1)     = -ln 2
      sum = -ln 6 = -1.791759469228055, |y| = 2, average = -0.8958797346140275
    row 1: labels (-100, -100, 0) (prompt of two tokens)
      t = 1 logits (ln 3, 0, 0):    log p(0) = ln 3 - log(3 + 1 + 1)     = ln 0.6
      sum = average = -0.5108256237659907, |y| = 1
    """
    logits = torch.zeros(2, 3, 3, dtype=F64)
    logits[0, 1] = torch.tensor([0.0, LN2, 0.0])
    logits[1, 1] = torch.tensor([LN3, 0.0, 0.0])
    labels = torch.tensor([[-100, 2, 1], [-100, -100, 0]])
    return logits, labels


def test_sequence_logps_hand_values():
    logits, labels = hand_example()
    avg = sequence_logps(logits, labels)
    total = sequence_logps(logits, labels, average=False)
    torch.testing.assert_close(total, torch.tensor([-1.791759469228055, -0.5108256237659907], dtype=F64))
    torch.testing.assert_close(avg, torch.tensor([-0.8958797346140275, -0.5108256237659907], dtype=F64))
    assert token_counts(labels).tolist() == [2, 1]


def test_masked_positions_are_ignored():
    logits, labels = hand_example()
    before = sequence_logps(logits, labels)
    noisy = logits.clone()
    noisy[:, 2] = torch.tensor([1e4, -7.0, float("inf")])  # last position predicts nothing
    noisy[1, 0] = 123.0  # predicts labels[1, 1] = -100
    assert torch.equal(sequence_logps(noisy, labels), before)
    # labels[:, 0] is never predicted, so its value does not matter either.
    relabelled = labels.clone()
    relabelled[:, 0] = 1
    assert torch.equal(sequence_logps(logits, relabelled), before)
    assert token_counts(relabelled).tolist() == [2, 1]


def test_zero_token_row_raises():
    logits, labels = hand_example()
    labels[1] = torch.tensor([0, -100, -100])  # only labels[:, 0] set: nothing is scored
    with pytest.raises(ValueError, match=r"rows \[1\] have no completion tokens"):
        sequence_logps(logits, labels)
    with pytest.raises(ValueError, match="no completion tokens"):
        chunked_sequence_logps(torch.randn(2, 3, 4), torch.randn(3, 4), labels)


@pytest.mark.parametrize("bad", [-1, 3])
def test_out_of_range_label_raises(bad):
    logits, labels = hand_example()
    labels[0, 2] = bad
    with pytest.raises(ValueError, match="labels must be -100 or in"):
        sequence_logps(logits, labels)


def test_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_sequence_logps(torch.randn(1, 3, 4), torch.randn(5, 4), torch.ones(1, 3, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="hidden size"):
        chunked_sequence_logps(torch.randn(1, 3, 4), torch.randn(5, 3), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_slice"):
        chunked_sequence_logps(torch.randn(1, 3, 4), torch.randn(5, 4), torch.ones(1, 3, dtype=torch.long), vocab_slice=0)


def random_case(seed, B=3, T=9, H=8, V=13, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / math.sqrt(H)
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.4] = -100
    labels[:, -1] = torch.randint(0, V, (B,), generator=g)  # at least one scored token per row
    upstream = torch.randn(B, generator=g, dtype=dtype)  # so grad_out differs per row
    return hidden, weight, b, labels, upstream


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_matches_plain_values_and_gradients(seed, average):
    hidden, weight, bias, labels, upstream = random_case(seed)
    leaves = [x.requires_grad_() for x in (hidden, weight, bias)]
    plain = sequence_logps(hidden @ weight.T + bias, labels, average=average)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), leaves)
    n_scored = int(token_counts(labels).sum())
    for chunk_size, vocab_slice in ((1, None), (2, 1), (5, 4), (n_scored, 13), (1000, 6), (3, 100)):
        out = chunked_sequence_logps(hidden, weight, labels, chunk_size=chunk_size, average=average, bias=bias,
                                     vocab_slice=vocab_slice)
        assert out.dtype == torch.float32 and out.shape == (3,)
        assert rel_err(out, plain) < 1e-5, chunk_size
        grads = torch.autograd.grad((out * upstream).sum(), leaves)
        for got, want in zip(grads, plain_grads):
            assert rel_err(got, want) < 1e-5, chunk_size


def test_chunked_gives_no_gradient_to_unscored_positions_and_frozen_head():
    hidden, weight, _, labels, _ = random_case(2, bias=False)
    hidden.requires_grad_()
    out = chunked_sequence_logps(hidden, weight, labels, chunk_size=4)  # weight frozen
    (grad,) = torch.autograd.grad(out.sum(), hidden)
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    assert (grad[~scored] == 0).all()
    assert (grad[scored].abs().sum(-1) > 0).all()


def test_chunked_gradcheck_float64():
    hidden, weight, bias, labels, _ = random_case(3, B=2, T=4, H=3, V=5, dtype=F64)
    for x in (hidden, weight, bias):
        x.requires_grad_()

    for vocab_slice in (None, 2):
        def fn(h, w, b):
            return chunked_sequence_logps(h, w, labels, chunk_size=2, bias=b, vocab_slice=vocab_slice)

        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_bfloat16_paths(monkeypatch):
    hidden, weight, _, labels, upstream = random_case(4, B=2, T=12, H=16, V=40, bias=False)
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    # Plain: bf16 logits are scored in float32, so they equal the upcast logits' score.
    logits16 = h16 @ w16.T
    out16 = sequence_logps(logits16, labels)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, sequence_logps(logits16.float(), labels))
    # Chunked: the math is float32 from the bf16 values; grads come back in bf16.
    ref_h, ref_w = h16.float().requires_grad_(), w16.float().requires_grad_()
    ref = sequence_logps(ref_h @ ref_w.T, labels)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (ref_h, ref_w))
    h16.requires_grad_()
    w16.requires_grad_()
    # A bf16 head is converted to float32 one vocab slice at a time (never all of it):
    # slices of 7 rows here; the numbers are those of the whole float32 head.
    monkeypatch.setattr(logps_mod, "VOCAB_SLICE_ELEMENTS", 7 * 16)
    assert logps_mod._vocab_slice(w16, torch.float32) == 7 and logps_mod._vocab_slice(w16.float(), torch.float32) == 40
    out = chunked_sequence_logps(h16, w16, labels, chunk_size=3)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    grads = torch.autograd.grad((out * upstream).sum(), (h16, w16))
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert rel_err(got.float(), want) < 1e-2


def test_importing_losses_and_logps_stays_light():
    """Habit 4: no Ray, DeepSpeed, transformers or vLLM behind these imports."""
    code = (
        "import sys, simpo_ray.losses, simpo_ray.logps; "
        "heavy = [m for m in ('ray', 'deepspeed', 'transformers', 'vllm') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
