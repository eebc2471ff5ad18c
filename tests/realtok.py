"""Real tokenizers without a hub, for tests: Mistral-7B's sentencepiece model (v1, 32000
pieces), shipped in the ``mistral_common`` package that vLLM installs, converted once per
session by transformers, with the chat templates users train on.

``tokenizer_folder(template, dest)`` writes a Hugging Face tokenizer folder;
``model_folder(template, dest)`` adds a small random ``MistralForCausalLM`` of the
tokenizer's vocabulary (head_dim 32: vLLM's CPU backend accepts it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# The four template families of issue 14, as their models ship them (Llama-2 / Mistral
# [INST] with a <<SYS>> block, Zephyr / alignment-handbook, ChatML, Llama-3 headers).
TEMPLATES = {
    "inst": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + m['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{% elif m['role'] == 'user' %}{{ '[INST] ' + (sys if sys is defined and loop.index0 == 1 else '') "
        "+ m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"),
    "zephyr": (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>\\n' + m['content'] + eos_token }}"
        "{% elif m['role'] == 'system' %}{{ '<|system|>\\n' + m['content'] + eos_token }}"
        "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\\n' + m['content'] + eos_token }}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
        "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
}
# Control tokens each template needs beyond the sentencepiece model's <s>, </s>, <unk>.
SPECIALS = {"inst": [], "zephyr": [], "chatml": ["<|im_start|>", "<|im_end|>"],
            "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


def sentencepiece_model() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def _base() -> Path:
    """The converted tokenizer, saved once per cache (conversion takes ~9 s, loading 0.7 s)."""
    cache = Path(os.environ.get("SIMPO_RAY_CACHE") or tempfile.gettempdir()) / "mistral-v1-tokenizer"
    if (cache / "tokenizer.json").exists():
        return cache
    from transformers import AutoTokenizer

    src = Path(tempfile.mkdtemp(prefix="sp-"))
    shutil.copy(sentencepiece_model(), src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    tok = AutoTokenizer.from_pretrained(str(src))
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=cache.parent))
    tok.save_pretrained(tmp)
    shutil.rmtree(src)
    os.replace(tmp, cache)
    return cache


def tokenizer(template: str):
    """The Mistral v1 tokenizer with ``template``'s chat template and control tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_base()))
    if SPECIALS[template]:
        tok.add_special_tokens({"additional_special_tokens": SPECIALS[template]})
    tok.chat_template = TEMPLATES[template]
    return tok


def tokenizer_folder(template: str, dest) -> Path:
    dest = Path(dest)
    tokenizer(template).save_pretrained(dest)
    return dest


def model_folder(template: str, dest, seed: int = 0) -> Path:
    """A small random MistralForCausalLM (2 layers, hidden 64, head_dim 32) beside the
    tokenizer: a real architecture and a real vocabulary."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tok = tokenizer(template)
    dest = Path(dest)
    tok.save_pretrained(dest)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    MistralForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    return dest
