"""The built-in tiny model: a Llama-style model and a byte-level tokenizer made locally.

Nothing is downloaded. The same spec and seed always give the same weights, so the
driver and every worker (on any node) can materialize the folder on their own and
agree bit for bit. ``model.name_or_path: tiny`` in a config selects it.

Tokenizer: byte-level BPE with no merges (256 byte symbols) plus special tokens, a
chat template ``<|bos|><|user|>\\n...<|end|><|assistant|>\\n...<|end|>``. BOS is written
by the chat template only (never added again by the tokenizer) and ``<|end|>`` is both
the end-of-turn and the EOS token, so every completion closes the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tokenizer():
    """A PreTrainedTokenizerFast over bytes; ids 0..5 are the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="right", model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_model(spec: dict):
    """A LlamaForCausalLM in float32 from ``spec`` (a TinyModelConfig as a dict)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    n_vocab = len(SPECIAL_TOKENS) + 256
    head_dim = spec["hidden_size"] // spec["num_heads"]
    config = LlamaConfig(
        vocab_size=(n_vocab + 63) // 64 * 64,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_heads"],
        head_dim=head_dim,
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    # fork_rng: building the model must not disturb the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = LlamaForCausalLM(config)
    return model


def cached_folder(prefix: str, spec: dict, write: Callable[[Path], None],
                  root: str | os.PathLike | None = None) -> Path:
    """``<root>/<prefix>-<spec hash>``, made once by ``write(folder)``; its path. ``root``:
    default $SIMPO_RAY_CACHE, else ~/.cache/simpo_ray.

    Safe under concurrency: each caller builds in a private temp folder and renames it
    into place; a loser of the race just uses the winner's identical folder. A folder
    counts as made when it holds ``config.json``.
    """
    root = Path(root or os.environ.get("SIMPO_RAY_CACHE", Path.home() / ".cache" / "simpo_ray"))
    target = root / f"{prefix}-{spec_hash(spec)}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=root))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def materialize(spec: dict, cache_root: str | os.PathLike | None = None) -> Path:
    """Build model + tokenizer into a cache folder keyed by the spec; return its path."""

    def write(folder: Path) -> None:
        build_model(spec).save_pretrained(folder, safe_serialization=True)
        build_tokenizer().save_pretrained(folder)
        (folder / "tiny_spec.json").write_text(json.dumps(spec, sort_keys=True, indent=1))

    return cached_folder("tiny", spec, write, cache_root)
