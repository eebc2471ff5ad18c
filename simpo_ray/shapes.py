"""Model shapes for the memory planner and the scaling ladder: what the arithmetic needs
from a decoder-only transformer, read from a Hugging Face config, a built-in table of the
architectures our recipes name (so ``simpo-ray plan`` works offline), or the tiny spec."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from simpo_ray.config import RunConfig


class PlanError(ValueError):
    """The model's shape could not be found (names the model and where it looked)."""


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs from a decoder-only transformer config."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False   # q, k, v biases
    o_proj_bias: bool = False      # Llama's attention_bias also biases o_proj; Qwen2's does not
    mlp_bias: bool = False
    norms_per_layer: int = 2
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.o_proj_bias:
            attn += h
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        return attn + mlp + self.norms_per_layer * h

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def params(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embedding_params()
        return self.embedding_params() + self.num_layers * self.layer_params() + self.hidden_size + head

    def largest_module_params(self) -> int:
        """Largest parameter count held directly by one module (what ZeRO-3 gathers at
        once; DeepSpeed's estimator calls it the largest layer)."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        return max(self.embedding_params(), h * i + (i if self.mlp_bias else 0),
                   h * q + (q if self.attention_bias else 0), h * kv)

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per trained token (forward + backward): 6 x the parameters that do
        matmuls (all but the input embedding lookup; a tied matrix still does the head)
        plus attention 12 x layers x q_dim x T (PaLM, Chowdhery et al. 2022, appendix B)."""
        dense = self.params() - (0 if self.tie_word_embeddings else self.embedding_params())
        return 6.0 * dense + 12.0 * self.num_layers * self.q_dim * seq_len


# Shapes of the models our recipes name, so `simpo-ray plan` works offline. Values are
# the public config.json fields of each model.
def _llama(name, h, i, layers, heads, kv, vocab=128256):
    return ModelShape(name, vocab, h, i, layers, heads, kv, h // heads, source="built-in table")


_TABLE = [
    (("meta-llama/meta-llama-3-8b", "meta-llama/meta-llama-3-8b-instruct", "meta-llama/llama-3.1-8b",
      "meta-llama/llama-3.1-8b-instruct", "princeton-nlp/llama-3-base-8b-sft"),
     _llama("llama-3-8b", 4096, 14336, 32, 32, 8)),
    (("meta-llama/meta-llama-3-70b", "meta-llama/meta-llama-3-70b-instruct", "meta-llama/llama-3.1-70b",
      "meta-llama/llama-3.1-70b-instruct", "meta-llama/llama-3.3-70b-instruct"),
     _llama("llama-3-70b", 8192, 28672, 80, 64, 8)),
    (("mistralai/mistral-7b-v0.1", "mistralai/mistral-7b-instruct-v0.2", "alignment-handbook/zephyr-7b-sft-full",
      "huggingfaceh4/mistral-7b-sft-beta"),
     _llama("mistral-7b", 4096, 14336, 32, 32, 8, vocab=32000)),
    (("google/gemma-2-9b", "google/gemma-2-9b-it"),
     ModelShape("gemma-2-9b", 256000, 3584, 14336, 42, 16, 8, 256, tie_word_embeddings=True,
                norms_per_layer=4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                source="built-in table")),
]
KNOWN_SHAPES = {alias: shape for aliases, shape in _TABLE for alias in aliases}


def shape_from_hf_config(hf, name: str = "", source: str = "") -> ModelShape:
    """ModelShape from a transformers PretrainedConfig (or anything with its fields)."""
    if hasattr(hf, "get_text_config"):
        hf = hf.get_text_config()
    for moe in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(hf, moe, None):
            raise PlanError(f"{name}: mixture-of-experts models are not modelled by the planner")
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    model_type = getattr(hf, "model_type", "")
    return ModelShape(
        name=name or model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_dim=head_dim,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf, "attention_bias", False) or model_type.startswith("qwen2")),
        o_proj_bias=bool(getattr(hf, "attention_bias", False)) and not model_type.startswith("qwen2"),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
        final_logit_softcapping=getattr(hf, "final_logit_softcapping", None),
        attn_logit_softcapping=getattr(hf, "attn_logit_softcapping", None),
        source=source)


def tiny_shape(spec: dict) -> ModelShape:
    """The built-in tiny Llama (simpo_ray.tiny.build_model) without building it."""
    from simpo_ray.tiny import SPECIAL_TOKENS

    vocab = (len(SPECIAL_TOKENS) + 256 + 63) // 64 * 64
    h, heads = spec["hidden_size"], spec["num_heads"]
    return ModelShape(f"tiny(hidden {h}, layers {spec['num_layers']})", vocab, h, spec["intermediate_size"],
                      spec["num_layers"], heads, heads, h // heads, source="tiny spec")


def model_shape(cfg: RunConfig) -> ModelShape:
    """The shape of cfg.model: tiny spec, a local folder's config.json, the built-in
    table, else AutoConfig (which only works offline if the config is in the HF cache)."""
    name = cfg.model.name_or_path
    if name == "tiny":
        return tiny_shape(dataclasses.asdict(cfg.model.tiny))
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(local), trust_remote_code=cfg.model.trust_remote_code)
        return shape_from_hf_config(hf, name, source=f"{local / 'config.json'}")
    if name.lower() in KNOWN_SHAPES:
        return dataclasses.replace(KNOWN_SHAPES[name.lower()], name=name)
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - offline, gated, or a typo: say where we looked
        known = ", ".join(sorted({a for a in KNOWN_SHAPES}))
        raise PlanError(f"model {name!r}: not a local folder with config.json, not in the built-in "
                        f"table ({known}), and AutoConfig could not load it ({type(e).__name__}: {e})") from None
    return shape_from_hf_config(hf, name, source="AutoConfig")
