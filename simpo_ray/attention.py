"""Attention per segment: packed batches without a dense (R, 1, L, L) mask.

A transformers attention function registered as ``"simpo_segments"`` (through
``AttentionInterface``, plus an ``AttentionMaskInterface`` entry so no dense mask is
built for it). ``use_segment_attention(model)`` switches a model to it; a packed batch
then passes ``segments.segment_kwargs(batch)`` through the model forward with
``position_ids`` and ``attention_mask=None``. Transformers 5.19's Llama, Mistral and
Qwen2 hand every extra forward kwarg down ``Model -> DecoderLayer -> Attention ->
attention function`` unchanged (as they do flash-attn's ``cu_seq_lens_q``), also
under gradient checkpointing (``GradientCheckpointingLayer`` binds the kwargs with a
partial). ZeRO-3 is unaffected: this only replaces the attention of already gathered
q, k, v.

Per segment (``segments``: a run of queries and the keys it may see), causal and
bottom-right aligned (query i of n sees keys j <= i + m - n of m):

* CUDA, fp16/bf16, flash-attn importable: one ``flash_attn_varlen_func`` call over all
  segments, with the keys gathered per segment (``segment_key_index``) when a shared
  prompt's rejected branch reads P[:-1]; flash-attn >= 2.1 aligns causal bottom-right
  when seqlen_q != seqlen_k.
* otherwise (CPU): a loop of ``scaled_dot_product_attention`` calls, one per segment
  (``is_causal`` when keys = queries, else a small (n, m) mask). The work is the sum
  of the segments' n x m, not (R x L)^2.

GQA (fewer kv heads), the model's ``scaling``, dropout and a sliding window
(Mistral / Qwen2's ``sliding_window`` kwarg, counted in positions) are honoured;
soft-capping and attention sinks are refused. Without segment kwargs (generation
probes, padded batches) the call goes to transformers' SDPA with the usual masks;
packed ``position_ids`` without segment kwargs are refused rather than attended
across sequences.
"""

from __future__ import annotations

NAME = "simpo_segments"
_SEGMENT_KEYS = ("segment_spans", "segment_key_index", "segment_cu_q", "segment_cu_k",
                 "segment_max_q", "segment_max_k")


def register() -> str:
    """Register the attention and its mask function with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def use_segment_attention(model) -> str:
    """Switch a transformers model (or ``policy.PolicyLogps``, whose ``lm`` it is) to
    segment attention; returns the implementation it had (to switch back with
    ``model.set_attn_implementation``). Only ``config._attn_implementation`` changes."""
    lm = getattr(model, "lm", model)
    previous = lm.config._attn_implementation
    lm.set_attn_implementation(register())
    return previous


def uses_segment_attention(model) -> bool:
    lm = getattr(model, "lm", model)
    return lm.config._attn_implementation == NAME


def _mask(*args, attention_mask=None, **kwargs):
    """The mask function of ``NAME``: a packed batch (``attention_mask=None``) gets no
    mask (the segments are the mask); a 2D padding mask (generation, padded batches)
    gets SDPA's, for the SDPA fallback below."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _bottom_right_mask(n: int, m: int, window, device):
    """(n, m) bool: query i (position i + m - n) sees key j (position j) when
    j <= i + m - n and, with a sliding window, i + m - n - j < window."""
    import torch

    q = torch.arange(m - n, m, device=device)[:, None]
    k = torch.arange(m, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= q - k < window
    return mask


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _fallback(module, query, key, value, attention_mask, sliding_window=None, **kwargs):
    """No segments: transformers' SDPA with the mask ``_mask`` made."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n, m = query.shape[2], key.shape[2]
    if attention_mask is None and n > 1:
        pos = kwargs.get("position_ids")
        if pos is not None and bool((pos.diff(dim=-1) != 1).any()):
            raise ValueError(f"packed position_ids reached '{NAME}' attention without segment kwargs; "
                             "pass segments.segment_kwargs(batch) with the forward")
        if sliding_window is not None and m > sliding_window:
            attention_mask = _bottom_right_mask(n, m, sliding_window, query.device)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                      sliding_window=None, softcap=None, s_aux=None, segment_spans=None, segment_key_index=None,
                      segment_cu_q=None, segment_cu_k=None, segment_max_q=None, segment_max_k=None, **kwargs):
    """The attention function: query (R, H, L, D), key / value (R, H_kv, L, D) ->
    ((R, L, H, D), None), each segment's queries against its own keys only.
    ``attention_mask`` is ignored when segment kwargs are given (it is None for them)."""
    import torch

    if segment_spans is None:
        return _fallback(module, query, key, value, attention_mask, sliding_window=sliding_window,
                         scaling=scaling, dropout=dropout, softcap=softcap, s_aux=s_aux, **kwargs)
    if softcap is not None or s_aux is not None:
        raise NotImplementedError(f"'{NAME}' attention has no soft-capping or attention sinks")
    R, H, L, D = query.shape
    H_kv = key.shape[1]
    if H % H_kv:
        raise ValueError(f"{H} query heads are not a multiple of {H_kv} key/value heads")
    # (R, H, L, D) -> (R x L, H, D): the flat token order the spans index.
    q = query.transpose(1, 2).reshape(R * L, H, D)
    k = key.transpose(1, 2).reshape(R * L, H_kv, D)
    v = value.transpose(1, 2).reshape(R * L, H_kv, D)
    if segment_key_index is not None:  # a shared prompt's rejected branch reads P[:-1] again
        k, v = k.index_select(0, segment_key_index), v.index_select(0, segment_key_index)
    varlen = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if varlen is not None:
        window = (-1, -1)
        if sliding_window is not None and segment_max_k > sliding_window:
            window = (sliding_window - 1, sliding_window - 1)  # transformers' convention; causal cuts the right
        out = varlen(q, k, v, segment_cu_q.to(q.device), segment_cu_k.to(q.device), segment_max_q,
                     segment_max_k, dropout_p=dropout, softmax_scale=scaling, causal=True, window_size=window)
    else:
        out = _segment_loop(q, k, v, segment_spans, scaling, dropout, sliding_window)
    return out.reshape(R, L, H, D), None


def _segment_loop(q, k, v, spans, scaling, dropout, sliding_window):
    """(N, H, D) queries, (K, H_kv, D) gathered keys / values -> (N, H, D), one SDPA
    call per segment; padding segments give zeros (nothing real reads them)."""
    import torch
    import torch.nn.functional as F

    H, H_kv = q.shape[1], k.shape[1]
    outs = []
    for q0, q1, k0, k1, pad in spans:
        n, m = q1 - q0, k1 - k0
        if pad:
            outs.append(q.new_zeros(n, H, q.shape[2]))
            continue
        qs = q[q0:q1].transpose(0, 1)[None]  # (1, H, n, D)
        ks, vs = k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
        if H_kv != H:  # GQA: kv head j serves query heads j x rep .. (j + 1) x rep - 1
            ks, vs = ks.repeat_interleave(H // H_kv, 0), vs.repeat_interleave(H // H_kv, 0)
        limited = sliding_window is not None and m > sliding_window
        mask = _bottom_right_mask(n, m, sliding_window, q.device) if (n != m or limited) else None
        o = F.scaled_dot_product_attention(qs, ks[None], vs[None], attn_mask=mask, dropout_p=dropout,
                                           is_causal=mask is None, scale=scaling)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)
