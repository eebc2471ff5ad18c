"""GPU paths of on-policy generation and the chunked head. Skipped without CUDA.

Run on a GPU machine with: make test TORCH_SPEC=torch EXTRAS=dev,gpu ARGS="tests/gpu"
"""

import json
import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_vllm_cuda_generation_in_a_gpu_actor(ray_local, tmp_path):
    """The CUDA vLLM engine in a Ray actor holding one GPU: every prompt gets its
    pairs or a counted drop, and a rerun with the same seeds writes nothing new."""
    pytest.importorskip("vllm")
    from simpo_ray.config import RunConfig
    from simpo_ray.generate import run_generation
    from tests.conftest import REPO

    cfg = RunConfig.from_yaml(os.path.join(REPO, "examples", "onpolicy_tiny_cpu.yaml"), [
        f"output.root={tmp_path}", "output.name=gpu-gen", "generate.use_gpu=true",
        "generate.max_prompts=16", "generate.max_tokens=24", "model.dtype=bfloat16"])
    out = tmp_path / "generated"
    totals = run_generation(cfg, "tiny", out)
    assert totals["samples"] == 16 * cfg.generate.num_samples
    assert totals["pairs"] + totals["dropped_total"] == 16
    again = run_generation(cfg, "tiny", out)
    assert again["pairs"] == totals["pairs"] and again["pipeline_s"] is None  # all parts already done
    assert json.loads((out / "generation.json").read_text())["done"]


def test_chunked_head_bf16_on_cuda_matches_the_plain_head():
    """cuBLAS bf16 GEMMs with vocab slices: values and gradients of the chunked head
    against the plain bf16 logits scored in float32."""
    from simpo_ray.logps import chunked_sequence_logps, sequence_logps

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, V = 4, 256, 512, 32000
    hidden = torch.randn(B, T, H, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(V, H, device="cuda", generator=g) / H ** 0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (B, T), device="cuda", generator=g)
    labels[:, : T // 4] = -100
    plain = sequence_logps(hidden @ weight.T, labels)
    pg = torch.autograd.grad(plain.sum(), (hidden, weight))
    out = chunked_sequence_logps(hidden, weight, labels, chunk_size=128, vocab_slice=5000)
    og = torch.autograd.grad(out.sum(), (hidden, weight))
    torch.testing.assert_close(out, plain, rtol=2e-3, atol=2e-3)
    for a, b in zip(og, pg):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2
