"""Reference log-probs for DPO, IPO and R-DPO, computed once before training.

A Ray Data pass with an actor pool holding the frozen reference model (the starting
policy) adds ``ref_chosen_logps`` and ``ref_rejected_logps`` (summed completion
log-probs) to every row, so training never keeps a reference model in memory.
SimPO, CPO and ORPO skip this pass. The reference runs the same ``PolicyLogps`` path
as training, so at step 0 the policy/reference log-ratios are exactly zero.
"""

from __future__ import annotations


class ReferenceLogps:
    """map_batches actor: triplet batch -> the same batch + the two reference columns."""

    def __init__(self, model_path: str, dtype: str, attn_implementation: str, chunk_size: int,
                 pad_id: int, trust_remote_code: bool = False, pack_max_tokens: int | None = None,
                 layout: dict | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from simpo_ray.policy import PolicyLogps

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        lm = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32,
            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            use_safetensors=True)
        # Packed as training packs (RunPlan.layout): the shared prompt, attention per segment.
        self.layout = layout or {}
        if self.layout.get("segment_attention"):
            from simpo_ray.attention import use_segment_attention

            use_segment_attention(lm)
        self.model = PolicyLogps(lm, chunk_size=chunk_size).to(self.device).eval().requires_grad_(False)
        self.pad_id = pad_id
        # Packed like training (data.packing): rows of at most pack_max_tokens, or one
        # row for flash-attn varlen; None: padded rows.
        self.pack_max_tokens = pack_max_tokens
        self.flash = attn_implementation == "flash_attention_2"

    def __call__(self, batch: dict) -> dict:
        import torch

        from simpo_ray import collate as C

        if self.pack_max_tokens:
            b, extra = C.packed_model_inputs(batch, self.pad_id, self.pack_max_tokens, self.flash, **self.layout)
        else:
            b, extra = C.collate_numpy_batch(batch, self.pad_id, 8), {}
        b = {k: v.to(self.device) for k, v in b.items()}
        extra = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in extra.items()}
        with torch.no_grad():
            sums, _ = self.model(b["input_ids"], b.get("attention_mask"), b["labels"],
                                 sequence_index=b.get("sequence_index"), **extra)
        n = sums.shape[0] // 2
        sums = sums.float().cpu().numpy()
        return dict(batch, ref_chosen_logps=sums[:n], ref_rejected_logps=sums[n:])


def add_reference_logps(ds, cfg, model_path: str, pad_id: int, layout: dict | None = None):
    """Dataset of triplets -> materialized dataset with reference columns. ``layout``:
    the packed layout training uses (``RunPlan.layout``; default: what
    ``collate.packed_layout`` picks for this config and model)."""
    from simpo_ray.collate import packed_layout
    from simpo_ray.models import read_model_config

    t = cfg.train
    if layout is None:
        layout = packed_layout(cfg.data, cfg.model.attn_implementation, read_model_config(model_path))
    return ds.map_batches(
        ReferenceLogps, batch_size=4 * t.micro_batch_size, batch_format="numpy",
        concurrency=(1, t.num_workers),
        num_gpus=1 if t.use_gpu else 0, num_cpus=1,
        fn_constructor_kwargs=dict(
            model_path=model_path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
            chunk_size=cfg.model.logps_chunk_size, pad_id=pad_id,
            trust_remote_code=cfg.model.trust_remote_code,
            pack_max_tokens=cfg.data.pack_row_tokens if cfg.data.packing else None, layout=layout),
    ).materialize()
