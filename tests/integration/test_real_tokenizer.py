"""A real tokenizer and a real architecture end to end: Mistral-7B's sentencepiece
tokenizer with a ChatML template (tests/realtok.py) and a small random
``MistralForCausalLM`` of its 32k vocabulary, trained for 4 steps on 2 ZeRO-3 workers.

Proves what the byte tokenizer of the other fits cannot: `simpo-ray export` of a
mid-run checkpoint consolidates the DeepSpeed shards into a folder that transformers
and vLLM (CPU) load, with vLLM's greedy tokens equal to transformers' greedy, stopping
at the template's end-of-turn token; the export of the last checkpoint equals the
end-of-run export tensor for tensor; both model cards show the resolved objective and
the final train and held-out metrics.
"""

import json
import re

import pytest
import torch

from tests import realtok
from tests.integration.conftest import tiny_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chatml_run(ray_local, tmp_path_factory):
    from simpo_ray.train import train

    root = tmp_path_factory.mktemp("realtok")
    model = realtok.model_folder("chatml", root / "mistral-chatml")
    cfg = tiny_cfg(root, **{"model.name_or_path": str(model), "output.name": "chatml", "train.max_steps": 4,
                            "data.max_length": 256, "data.max_prompt_length": 128})
    _, summary = train(cfg)
    assert summary["finished"]
    return cfg, summary, model


def _card_metrics(card: str) -> dict:
    return json.loads(card.split("## Final metrics")[1].split("```json")[1].split("```")[0])


def test_export_of_checkpoints_matches_the_run_and_loads(chatml_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from simpo_ray.cli import main

    cfg, summary, _ = chatml_run
    run = summary["run_dir"]
    end = load_file(f"{run}/model/model.safetensors")
    assert main(["export", run]) == 0  # default: the newest whole checkpoint, the last step
    assert "exported checkpoint_000004 (step 4)" in capsys.readouterr().out
    last = load_file(f"{run}/export/checkpoint_000004/model.safetensors")
    assert set(last) == set(end) and all(torch.equal(last[k], end[k]) for k in end)

    assert main(["export", run, "--checkpoint", "checkpoint_000002", "--out", str(tmp_path / "mid")]) == 0
    mid = load_file(tmp_path / "mid" / "model.safetensors")
    assert set(mid) == set(end) and any(not torch.equal(mid[k], end[k]) for k in end)

    # the cards: the objective resolved, the data, the last train and held-out metrics
    lines = [json.loads(x) for x in open(f"{run}/metrics.jsonl")]
    g, ratio = cfg.simpo.resolved_gamma, cfg.simpo.resolved_gamma_beta_ratio
    for folder, step in ((f"{run}/model", 4), (str(tmp_path / "mid"), 2)):
        card = open(f"{folder}/README.md").read()
        assert f"loss simpo, beta {cfg.simpo.beta:g}, gamma {g:g} (gamma/beta {ratio:g})" in card
        assert summary["data"]["fingerprint"] in card and re.search(rf"- steps: {step} ", card)
        final = _card_metrics(card)
        reported = next(m for m in lines if m["step"] == step and "loss" in m)
        assert final["loss"] == pytest.approx(reported["loss"])
        assert final["eval/rewards/accuracies"] == pytest.approx(reported["eval/rewards/accuracies"])
        assert "data/dropped_total" not in final


def test_vllm_greedy_equals_transformers_greedy_on_a_mid_run_export(chatml_run, tmp_path):
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simpo_ray.cli import main
    from simpo_ray.generators import Generator, GeneratorSettings, stop_token_ids
    from simpo_ray.prompts import encode_prompt

    cfg, summary, _ = chatml_run
    folder = tmp_path / "mid"
    assert main(["export", summary["run_dir"], "--checkpoint", "checkpoint_000002", "--out", str(folder)]) == 0
    tok = AutoTokenizer.from_pretrained(folder)
    stops = stop_token_ids(cfg, str(folder))
    assert stops == sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id})
    questions = ["What is 12 + 30?", "Name a colour.", "Write one word about the sea.", "Count to three."]
    prompts = [{"prompt_id": str(i), "prompt_ids": encode_prompt(tok, [{"role": "user", "content": q}], 128)}
               for i, q in enumerate(questions)]

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = {}
    for p in prompts:
        ids = torch.tensor([p["prompt_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                                 eos_token_id=stops, pad_token_id=tok.eos_token_id)
        row = out[0, ids.shape[1]:].tolist()
        stop = next((i for i, t in enumerate(row) if t in stops), None)
        expected[p["prompt_id"]] = row[:stop + 1] if stop is not None else row

    # our vLLM generator actor, greedy (temperature 0), with the stop ids training uses
    settings = GeneratorSettings(backend="vllm", num_samples=1, temperature=0.0, top_p=1.0, max_tokens=16, seed=0,
                                 dtype="float32", stop_token_ids=stops,
                                 engine_kwargs={"kv_cache_memory_bytes": 64 << 20, "max_model_len": 256})
    actor = ray.remote(Generator).options(num_cpus=1, runtime_env={"env_vars": {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}).remote(str(folder), settings.to_dict())
    try:
        results = ray.get(actor.generate.remote(0, prompts, 0), timeout=300)["results"]
    finally:
        ray.kill(actor)
    got = {r["prompt_id"]: r["samples"][0]["token_ids"] for r in results}
    assert got == expected
