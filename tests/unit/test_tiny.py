import dataclasses

import torch

from simpo_ray.config import TinyModelConfig
from simpo_ray.tiny import build_model, materialize


def test_same_seed_same_weights_different_seed_different():
    spec = dataclasses.asdict(TinyModelConfig())
    a, b = build_model(spec), build_model(spec)
    c = build_model(dict(spec, seed=1))
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_materialized_folder_loads_offline(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert materialize(dataclasses.asdict(TinyModelConfig())) == tiny_path  # cached
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert len(tok) <= model.config.vocab_size
    assert tok("hi", add_special_tokens=False)["input_ids"] == list(tok.encode("hi", add_special_tokens=False))
    assert tok.chat_template and tok.eos_token == "<|end|>"
