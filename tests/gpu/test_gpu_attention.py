"""Segment attention on CUDA: flash-attn varlen in bf16 (and the SDPA loop in float32)
gives the padded path's log-probs and gradients, for both packed layouts. Skipped
without CUDA or flash_attn.

Tolerance (bf16): bf16 keeps 8 bits of mantissa, so no bf16 path matches float32 to
1e-5; the padded bf16 path (SDPA with its padding mask, what training runs today)
is the yardstick. Against a float32 padded reference on the same weights, the
segment path's error may be at most twice the padded bf16 path's error plus a small
floor (averaged log-probs: 2e-2 absolute; gradients: 2e-2 relative in norm). A wrong
attention (R reading C) is far outside that, as the last test checks.

    make test TORCH_SPEC=torch EXTRAS=dev,gpu ARGS="tests/gpu/test_gpu_attention.py"
"""

import copy

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from simpo_ray.attention import use_segment_attention  # noqa: E402
from simpo_ray.collate import collate_packed, collate_pairs  # noqa: E402
from simpo_ray.logps import packed_sequence_logps, packed_token_counts, sequence_logps  # noqa: E402
from simpo_ray.segments import collate_shared, segment_kwargs  # noqa: E402
from tests.unit.test_attention import B, _build, _loss, _pairs  # noqa: E402


def _cuda(batch):
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def _padded(model, P, C, R):
    model.set_attn_implementation("sdpa")
    b = _cuda(collate_pairs(P, C, R, pad_id=0))
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, b["labels"], average=False), (b["labels"][:, 1:] != -100).sum(1)


def _segments(model, b):
    use_segment_attention(model)
    kw = _cuda(segment_kwargs(b))
    b = _cuda(b)
    logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=None,
                   use_cache=False, **kw).logits
    return (packed_sequence_logps(logits, b["labels"], b["sequence_index"], 2 * B, average=False),
            packed_token_counts(b["labels"], b["sequence_index"], 2 * B))


def _run(model, logps_fn):
    sums, counts = logps_fn(model)
    loss = _loss(sums, counts)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return (sums / counts).detach().float(), torch.cat([g.float().flatten() for g in grads])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def pair_of_models(request):
    fp32 = _build(request.param).cuda()
    return fp32, copy.deepcopy(fp32).to(torch.bfloat16)


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("max_tokens", [72, None])
def test_flash_varlen_bf16_matches_the_padded_path(pair_of_models, layout, max_tokens):
    pytest.importorskip("flash_attn")
    fp32, bf16 = pair_of_models
    P, C, R = _pairs()
    collate = collate_packed if layout == "packed" else collate_shared
    avg_ref, g_ref = _run(fp32, lambda m: _padded(m, P, C, R))
    avg_pad, g_pad = _run(bf16, lambda m: _padded(m, P, C, R))
    avg_seg, g_seg = _run(bf16, lambda m: _segments(m, collate(P, C, R, pad_id=0, max_tokens=max_tokens)))
    pad_err = float((avg_pad - avg_ref).abs().max())
    assert float((avg_seg - avg_ref).abs().max()) <= 2 * pad_err + 2e-2
    assert _rel(g_seg, g_ref) <= 2 * _rel(g_pad, g_ref) + 2e-2


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_sdpa_loop_on_cuda_fp32_matches_the_padded_path(pair_of_models, layout):
    fp32, _ = pair_of_models
    P, C, R = _pairs()
    collate = collate_packed if layout == "packed" else collate_shared
    avg_ref, g_ref = _run(fp32, lambda m: _padded(m, P, C, R))
    avg_seg, g_seg = _run(fp32, lambda m: _segments(m, collate(P, C, R, pad_id=0, max_tokens=72)))
    torch.testing.assert_close(avg_seg, avg_ref, rtol=0, atol=1e-4)  # CUDA kernels: another summation order
    assert _rel(g_seg, g_ref) < 1e-4


def test_a_leak_is_far_outside_the_bf16_tolerance(pair_of_models):
    pytest.importorskip("flash_attn")
    fp32, bf16 = pair_of_models
    P, C, R = _pairs()
    b = collate_shared(P, C, R, pad_id=0)
    leaky = dict(b, branch=b["branch"].masked_fill(b["branch"] == 2, 1))  # R joins the chosen segment
    with torch.no_grad():
        ref, counts = _padded(fp32, P, C, R)
        pad, _ = _padded(bf16, P, C, R)
        got, _ = _segments(bf16, leaky)
    pad_err = float(((pad - ref) / counts).abs().max())
    assert float(((got - ref) / counts)[B:].abs().max()) > 2 * pad_err + 2e-2
