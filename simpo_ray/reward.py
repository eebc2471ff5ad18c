"""Reward scoring of generated samples: prompt + response text -> one float per sample.

The reward model is any Hugging Face sequence-classification model with one output (or
a ``score`` field, like ArmoRM), or ``tiny``: a randomly initialised local one built from
the tiny policy's shape and tokenizer (tests, the CPU demo). ``ScorerSettings`` is what a
scorer actor needs, typed: ``to_dict()`` on the driver, ``from_dict`` in the actor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from simpo_ray.runplan import _Boundary


@dataclass(frozen=True)
class ScorerSettings(_Boundary):
    """One scorer actor's model and batching (``generate.reward`` without the pool size)."""

    name_or_path: str
    dtype: str
    batch_size: int
    max_length: int
    trust_remote_code: bool = False
    use_gpu: bool = False
    # The tiny reward model's weights seed, and the policy's tiny shape it copies.
    seed: int = 1
    tiny: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> "ScorerSettings":
        r = cfg.generate.reward
        return cls(name_or_path=r.name_or_path, dtype=r.dtype, batch_size=r.batch_size, max_length=r.max_length,
                   trust_remote_code=r.trust_remote_code, use_gpu=r.use_gpu, seed=r.seed,
                   tiny=dataclasses.asdict(cfg.model.tiny))


def reward_model_path(s: ScorerSettings) -> str:
    """``tiny``: a randomly initialised LlamaForSequenceClassification (the tiny
    model's shape and tokenizer, seed ``s.seed``), built locally once; else as given."""
    if s.name_or_path != "tiny":
        return s.name_or_path
    from simpo_ray.tiny import build_model, build_tokenizer, cached_folder

    spec = dict(s.tiny, seed=s.seed)

    def write(folder) -> None:
        import torch
        from transformers import LlamaForSequenceClassification

        config = build_model(spec).config
        config.num_labels = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec["seed"])
            LlamaForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
        build_tokenizer().save_pretrained(folder)

    return str(cached_folder("tiny-reward", spec, write))


class RewardScorer:
    """The scorer actor's body (``settings``: a ``ScorerSettings.to_dict()``).

    The conversation is rendered with the reward model's own chat template (its
    tokenizer is not the policy's), batched in length order, right-padded (one at a
    time when the tokenizer has no pad token of its own)."""

    def __init__(self, settings: dict):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from simpo_ray.models import torch_dtype

        s = self.s = ScorerSettings.from_dict(settings)
        path = reward_model_path(s)
        self.device = "cuda" if s.use_gpu and torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=s.trust_remote_code)
        self.tok.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(s.dtype), trust_remote_code=s.trust_remote_code,
            use_safetensors=True).to(self.device).eval()
        # Padding is only safe with a pad token of its own: models find the last real token
        # by looking for it, and an EOS standing in would match the end of every turn. Without
        # one, sequences are scored one at a time (what such models' cards do).
        pad = self.tok.pad_token_id
        self.batch_size = s.batch_size if pad is not None and pad != self.tok.eos_token_id else 1
        if pad is not None and getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = pad

    def encode(self, turns: list[dict], text: str) -> list[int]:
        conv = turns + [{"role": "assistant", "content": text}]
        if self.tok.chat_template is not None:
            rendered = self.tok.apply_chat_template(conv, tokenize=False)
            return self.tok(rendered, add_special_tokens=False)["input_ids"]
        return self.tok("\n\n".join(m["content"] for m in conv))["input_ids"]

    def score(self, items: list[dict], index: int = 0) -> dict:
        """items: [{"prompt_id", "prompt", "samples": [{"sample", "text"}]}] ->
        {"scores": {prompt id: {sample: float}}, "truncated": n, "index": index}."""
        import torch

        seqs, truncated, limit = [], 0, self.s.max_length
        for it in items:
            for s in it["samples"]:
                ids = self.encode(it["prompt"], s["text"])
                truncated += len(ids) > limit
                seqs.append((it["prompt_id"], s["sample"], ids[:limit]))
        seqs.sort(key=lambda x: len(x[2]))
        scores: dict = {it["prompt_id"]: {} for it in items}
        pad = self.tok.pad_token_id
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            width = max(len(x[2]) for x in chunk)
            ids = torch.tensor([x[2] + [pad] * (width - len(x[2])) for x in chunk], device=self.device)
            mask = torch.tensor([[1] * len(x[2]) + [0] * (width - len(x[2])) for x in chunk], device=self.device)
            with torch.no_grad():
                out = self.model(input_ids=ids, attention_mask=mask)
            # ArmoRM-style models return a `score` field; plain ones one logit per sequence.
            vals = out.score if getattr(out, "score", None) is not None else out.logits
            vals = vals.float().reshape(len(chunk), -1)[:, 0].cpu().tolist()
            for (pid, j, _), v in zip(chunk, vals):
                scores[pid][j] = v
        return {"scores": scores, "truncated": truncated, "index": index}


def start_scorers(cfg) -> list:
    """``generate.reward.num_scorers`` scorer actors, each with its model loaded."""
    import ray

    r = cfg.generate.reward
    settings = ScorerSettings.from_config(cfg).to_dict()
    actors = [ray.remote(RewardScorer).options(num_cpus=r.cpus_per_scorer, num_gpus=1 if r.use_gpu else 0)
              .remote(settings) for _ in range(r.num_scorers)]
    ray.get([a.score.remote([]) for a in actors])
    return actors
