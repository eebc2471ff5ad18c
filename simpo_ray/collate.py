"""Triplets -> one batch: chosen first, then rejected, in one forward.

Pure functions of lists of ids; no Ray. Padded (``collate_pairs``): with B pairs and
longest sequence T, ``input_ids``, ``attention_mask`` and ``labels`` are (2B, T); rows
[0, B) are the chosen sequences and rows [B, 2B) the rejected ones. ``labels`` is -100
on the prompt and on padding, so only completion tokens are scored.

Packed (``collate_packed``): the same 2B sequences, in the same order, laid back to
back in R rows with ``position_ids`` restarting per sequence and a ``sequence_index``
per token, so per-sequence sums come from ``logps.packed_sequence_logps``. Helpers
build what the attention needs (a block-diagonal mask for SDPA/eager, the varlen
arguments for flash-attn) and re-cut a stream into token-budget batches. The
shared-prompt layout (the prompt computed once per pair) is in ``segments``.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

IGNORE = -100


def _sequences(prompt_ids, chosen_ids, rejected_ids) -> tuple[list, list]:
    """2B sequences (chosen first, then rejected) and their labels (-100 on the prompt)."""
    seqs, labels = [], []
    for completions in (chosen_ids, rejected_ids):
        for p, c in zip(prompt_ids, completions):
            p, c = list(p), list(c)
            if not c:
                raise ValueError("a pair with an empty completion reached collate")
            seqs.append(p + c)
            labels.append([IGNORE] * len(p) + c)
    return seqs, labels


def collate_pairs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                  rejected_ids: Sequence[Sequence[int]], pad_id: int,
                  pad_to_multiple_of: int = 1) -> dict:
    import torch

    seqs, labels = _sequences(prompt_ids, chosen_ids, rejected_ids)
    longest = max(len(s) for s in seqs)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    n = len(seqs)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    label_t = torch.full((n, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        label_t[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def collate_numpy_batch(batch: dict, pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """A Ray Data numpy batch (object arrays of id lists) -> collate_pairs."""
    return collate_pairs(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"],
                         pad_id, pad_to_multiple_of)


# ---------------------------------------------------------------- padding-free packing
def pack_rows(lengths: Sequence[int], max_tokens: int | None = None,
              multiple_of: int = 8) -> tuple[list[list[int]], int]:
    """Assign sequences to rows: (rows as lists of sequence indices, row length L).

    ``max_tokens=None``: one row holding everything (the flash-attn varlen layout).
    Otherwise rows of L <= max_tokens tokens: first-fit decreasing for a few
    candidate L (multiples of ``multiple_of`` near total / r for r rows, the longest
    sequence, the cap) and the L with the fewest slots R x L wins (ties: the shorter
    row, cheaper for attention). Deterministic; indices ascend within a row.
    """
    if not lengths:
        raise ValueError("nothing to pack")
    up = lambda n: -(-n // multiple_of) * multiple_of  # noqa: E731
    longest = max(lengths)
    if max_tokens is None:
        return [list(range(len(lengths)))], up(sum(lengths))
    if longest > max_tokens:
        raise ValueError(f"a sequence of {longest} tokens does not fit a packed row of {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    total = sum(lengths)
    # For r rows the best L sits near total / r; try those (plus a little slack for
    # first-fit), the longest sequence and the cap.
    cands = {up(longest), max_tokens}
    for r in range(1, len(lengths) + 1):
        cands.update(up(-(-total // r)) + j * multiple_of for j in range(3))
    best = None
    for L in sorted({min(c, max_tokens) for c in cands if c >= longest}):
        rows, room = [], []
        for i in order:
            for r, free in enumerate(room):
                if lengths[i] <= free:
                    rows[r].append(i)
                    room[r] -= lengths[i]
                    break
            else:
                rows.append([i])
                room.append(L - lengths[i])
        if best is None or len(rows) * L < best[0]:
            best = (len(rows) * L, [sorted(r) for r in rows], L)
        if len(rows) == 1:  # longer rows cannot do better than one row
            break
    return best[1], best[2]


def collate_packed(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                   rejected_ids: Sequence[Sequence[int]], pad_id: int, max_tokens: int | None = None,
                   pad_to_multiple_of: int = 8) -> dict:
    """B pairs -> 2B sequences packed into R rows of length L (no padding between them).

    Sequence k is chosen pair k for k < B and rejected pair k - B for k >= B (the
    padded path's row order). Returns (R, L) long tensors:

    * ``input_ids``: prompt + completion of each sequence back to back, ``pad_id`` at
      the end of a row.
    * ``position_ids``: 0, 1, ... restarting at every sequence (padding restarts too,
      so it reads as one more sequence and never joins a real one).
    * ``labels``: completion ids, -100 on prompts and padding. Each sequence starts
      with a prompt token (-100), so the shifted loss never scores a token from the
      sequence before it.
    * ``sequence_index``: k on every token of sequence k, -1 on padding.

    Attention must stay inside a sequence: pass ``attention_mask=None`` with the
    ``position_ids`` (transformers then builds the block-diagonal mask, or uses
    flash-attn varlen on a single row), or ``packed_attention_mask(sequence_index)``.
    """
    import torch

    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("packing needs a non-empty prompt: it separates a sequence from the one before")
    seqs, labels = _sequences(prompt_ids, chosen_ids, rejected_ids)
    rows, L = pack_rows([len(s) for s in seqs], max_tokens, pad_to_multiple_of)
    R = len(rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    label_t = torch.full((R, L), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    sequence_index = torch.full((R, L), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for k in members:
            n = len(seqs[k])
            input_ids[r, at:at + n] = torch.tensor(seqs[k], dtype=torch.long)
            label_t[r, at:at + n] = torch.tensor(labels[k], dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            sequence_index[r, at:at + n] = k
            at += n
        position_ids[r, at:] = torch.arange(L - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": label_t,
            "sequence_index": sequence_index}


def collate_packed_numpy_batch(batch: dict, pad_id: int, max_tokens: int | None = None,
                               pad_to_multiple_of: int = 8) -> dict:
    """A Ray Data numpy batch (object arrays of id lists) -> collate_packed."""
    return collate_packed(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"],
                          pad_id, max_tokens, pad_to_multiple_of)


def packed_attention_mask(sequence_index, dtype=None):
    """(R, L) sequence_index -> (R, 1, L, L) block-diagonal causal mask.

    Query t may attend to key s when s <= t and both belong to the same sequence;
    a padding token attends to itself only (no all-masked row, so no NaN). Boolean
    (True = attend; what SDPA takes) by default; for a float ``dtype`` it is
    additive (0 / dtype min; what eager attention takes).
    """
    import torch

    R, L = sequence_index.shape
    same = sequence_index[:, :, None] == sequence_index[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=sequence_index.device).tril()
    real = (sequence_index >= 0)[:, :, None]
    eye = torch.eye(L, dtype=torch.bool, device=sequence_index.device)
    mask = ((same & causal & real) | eye)[:, None]
    if dtype is None or dtype == torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def flatten_packed(batch: dict) -> dict:
    """(R, L) packed tensors -> (1, R x L): the single-row layout that flash-attn
    varlen needs (transformers only detects packing from position_ids at batch 1)."""
    return {k: v.reshape(1, -1) for k, v in batch.items()}


def flash_varlen_kwargs(position_ids) -> dict:
    """``cu_seq_lens_q/k`` and ``max_length_q/k`` for a (1, N) packed row, computed
    once per batch (transformers otherwise re-derives them from position_ids in
    every layer, with a device sync each time). Pass them to the model forward
    next to ``position_ids`` and ``attention_mask=None``."""
    import torch

    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packed_model_inputs(batch: dict, pad_id: int, max_tokens: int, flash: bool, share_prompt: bool = False,
                        segment_attention: bool | None = None):
    """A numpy pair batch -> (packed tensors, extra model kwargs): rows of at most
    ``max_tokens`` with position ids restarting per sequence (a block-diagonal mask
    under SDPA/eager), or one row: for flash-attn varlen with its cu_seq_lens, and with
    segment attention.

    ``share_prompt``: the shared-prompt layout (``segments.collate_shared``: the prompt
    once per pair). ``segment_attention`` (default: ``share_prompt``, which needs it):
    the extra kwargs carry ``segments.segment_kwargs`` instead, for a model switched by
    ``attention.use_segment_attention``; no dense mask, no cu_seq_lens."""
    from simpo_ray.segments import collate_shared_numpy_batch, segment_kwargs

    segment_attention = share_prompt if segment_attention is None else segment_attention
    if share_prompt and not segment_attention:
        raise ValueError("the shared-prompt layout needs segment attention (simpo_ray.attention)")
    # One row when attention does not depend on the row: flash-attn varlen, or attention
    # per segment (no dense mask: a row's length costs nothing, and one row has no
    # packing waste). Rows of at most max_tokens only for the dense block-diagonal mask.
    rows = None if flash or segment_attention else max_tokens
    b = (collate_shared_numpy_batch(batch, pad_id, max_tokens=rows) if share_prompt
         else collate_packed_numpy_batch(batch, pad_id, max_tokens=rows))
    extra = {"position_ids": b.pop("position_ids"), "num_sequences": 2 * len(batch["prompt_ids"])}
    if segment_attention:
        extra.update(segment_kwargs(b))
    elif flash:
        extra.update(flash_varlen_kwargs(extra["position_ids"]))
    return b, extra


def packed_layout(data_cfg, attn_implementation: str, model_config: dict) -> dict:
    """How packed batches are laid out for this run: ``packed_model_inputs``'s
    ``share_prompt`` and ``segment_attention``. ``data.share_prompt`` null means on
    wherever it is verified exact: SDPA / eager attention (flash-attn keeps its varlen
    rows, and takes the shared prompt only when asked), and a model whose attention has no
    soft-capping or sinks (``simpo_ray.attention`` refuses those; they keep the dense
    block-diagonal mask). ``model_config``: the model's config.json ({} when unknown)."""
    if not data_cfg.packing:
        return {"share_prompt": False, "segment_attention": False}
    flash = attn_implementation == "flash_attention_2"
    unsupported = bool(model_config.get("attn_logit_softcapping")) or model_config.get("model_type") == "gpt_oss"
    share = data_cfg.share_prompt if data_cfg.share_prompt is not None else not (flash or unsupported)
    return {"share_prompt": bool(share), "segment_attention": bool(share or not (flash or unsupported))}


def padding_stats(batch: dict) -> dict:
    """Real and padded token counts of a padded (``attention_mask``) or packed
    (``sequence_index``) batch: {"tokens", "slots", "pad_fraction"}."""
    real = batch["attention_mask"] != 0 if "attention_mask" in batch else batch["sequence_index"] >= 0
    tokens, slots = int(real.sum()), real.numel()
    return {"tokens": tokens, "slots": slots, "pad_fraction": 1 - tokens / slots if slots else 0.0}


def pair_cost(p: int, c: int, r: int, share_prompt: bool = False) -> int:
    """Packed tokens of one pair of prompt / chosen / rejected lengths p, c, r: 2p + c + r
    (the prompt in both sequences), or p + c + 1 + r with the prompt shared
    (``segments.collate_shared``: the prompt once, plus p')."""
    return p + c + 1 + r if share_prompt else 2 * p + c + r


def token_budget_batches(batches: Iterable[dict], max_tokens: int, share_prompt: bool = False) -> Iterator[dict]:
    """Re-cut a stream of pair batches into batches of whole pairs whose packed size
    (``pair_cost`` per pair: 2 x prompt + chosen + rejected, or prompt + chosen + 1 +
    rejected with ``share_prompt``) stays within ``max_tokens``. Order is kept; every
    other column rides along; each output is a dict of lists. The number of batches now
    depends on the data: under ZeRO-3 the ranks must agree on how many to run (see the
    worker)."""
    cols, used = None, 0
    for batch in batches:
        names = list(batch)
        for i in range(len(batch["prompt_ids"])):
            cost = pair_cost(len(batch["prompt_ids"][i]), len(batch["chosen_ids"][i]),
                             len(batch["rejected_ids"][i]), share_prompt)
            if cost > max_tokens:
                raise ValueError(f"a pair of {cost} tokens exceeds the token budget {max_tokens}")
            if cols is not None and used + cost > max_tokens:
                yield cols
                cols = None
            if cols is None:
                cols, used = {k: [] for k in names}, 0
            for k in names:
                cols[k].append(batch[k][i])
            used += cost
    if cols is not None:
        yield cols
