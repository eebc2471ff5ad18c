"""Packed rows as attention segments, and the shared-prompt layout.

Pure functions of id lists and small tensors; no model, no Ray.

Shared prompt (``collate_shared``): each pair is one group ``P | C | p' | R`` laid in a
packed row, where P is the prompt, C chosen, R rejected and p' a copy of P's last token:

    tokens     P[0] .. P[p-2]  P[p-1]  C[0] .. C[c-1]  p'    R[0] .. R[r-1]
    positions  0    .. p-2     p-1     p    .. p+c-1   p-1   p    .. p+r-1
    branch     0    .. 0       1       1    .. 1       2     2    .. 2
    labels     -100 .. -100    -100    C[0] .. C[c-1]  -100  R[0] .. R[r-1]

Attention: branch 0 (P[:-1]) and branch 1 (P[-1], C) attend causally within [P, C];
branch 2 (p', R) attends to P[:-1] and causally within [p', R], never to C. So p' sees
exactly what P[-1] sees (P[:-1] and itself, at the same position), has P[-1]'s hidden
state in every layer, and predicts R[0] as P[-1] does in the unshared layout: the
ordinary shifted labels score C and R with the numbers of their own padded rows, and
the prompt is computed once per pair instead of twice (p + c + 1 + r tokens, not
2p + c + r). ``sequence_index`` is k on P, C (chosen k) and B + k on p', R (rejected
k), the numbering of ``collate.collate_packed``, so ``logps.packed_*`` apply unchanged.

Segments (``segment_kwargs``): a packed batch of either layout as a list of attention
segments over the flattened (R x L) tokens, each a contiguous run of queries and the
keys it may see, causal and bottom-right aligned (query i of n sees keys <= i + m - n
of m). Plain packing: one segment per sequence, keys = queries. Shared prompt: per
pair a chosen segment [P, C] (keys = queries) and a rejected segment [p', R] whose
keys are P[:-1] + [p', R]. Padding runs are segments of their own, flagged. This is
what ``simpo_ray.attention`` reads, on CPU (a loop of small SDPA calls) and on GPU
(flash-attn varlen with the keys gathered per segment).
"""

from __future__ import annotations

from typing import Sequence

from simpo_ray.collate import IGNORE, pack_rows, pair_cost


def _shared_groups(prompt_ids, chosen_ids, rejected_ids) -> list[dict]:
    """One group per pair: ids, positions, labels, sequence index and branch lists."""
    B = len(prompt_ids)
    groups = []
    for k, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids)):
        p, c, r = list(p), list(c), list(r)
        if not p:
            raise ValueError("the shared-prompt layout needs a non-empty prompt: p' is a copy of its last token")
        if not c or not r:
            raise ValueError("a pair with an empty completion reached collate")
        n_p, n_c, n_r = len(p), len(c), len(r)
        groups.append({
            "ids": p + c + [p[-1]] + r,
            "pos": list(range(n_p + n_c)) + [n_p - 1] + list(range(n_p, n_p + n_r)),
            "labels": [IGNORE] * n_p + c + [IGNORE] + r,
            "seq": [k] * (n_p + n_c) + [B + k] * (1 + n_r),
            "branch": [0] * (n_p - 1) + [1] * (1 + n_c) + [2] * (1 + n_r),
        })
    return groups


def pack_shared_rows(prompt_ids, chosen_ids, rejected_ids, max_tokens: int | None = None,
                     multiple_of: int = 8) -> tuple[list[list[int]], int]:
    """``collate.pack_rows`` over whole pair groups of p + c + 1 + r tokens: (rows of
    pair indices, row length L). A group never splits across rows."""
    costs = [pair_cost(len(p), len(c), len(r), share_prompt=True)
             for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)]
    return pack_rows(costs, max_tokens, multiple_of)


def collate_shared(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                   rejected_ids: Sequence[Sequence[int]], pad_id: int, max_tokens: int | None = None,
                   pad_to_multiple_of: int = 8) -> dict:
    """B pairs -> R rows of length L in the shared-prompt layout (module docstring).

    Returns (R, L) long tensors: ``input_ids`` (``pad_id`` at a row's end),
    ``position_ids`` (padding restarts at 0), ``labels`` (-100 on P, p' and padding),
    ``sequence_index`` (k / B + k; -1 on padding), ``group_index`` (pair k on its whole
    group; -1 on padding) and ``branch`` (0 on P[:-1], 1 on P[-1] and C, 2 on p' and R;
    -1 on padding). The model needs segment attention (``simpo_ray.attention``) or
    ``shared_attention_mask``: transformers' own packed masks would read p' as the
    start of a new sequence and cut R off its prompt.
    """
    import torch

    groups = _shared_groups(prompt_ids, chosen_ids, rejected_ids)
    rows, L = pack_rows([len(g["ids"]) for g in groups], max_tokens, pad_to_multiple_of)
    R = len(rows)
    out = {"input_ids": torch.full((R, L), pad_id, dtype=torch.long),
           "position_ids": torch.zeros((R, L), dtype=torch.long),
           "labels": torch.full((R, L), IGNORE, dtype=torch.long),
           "sequence_index": torch.full((R, L), -1, dtype=torch.long),
           "group_index": torch.full((R, L), -1, dtype=torch.long),
           "branch": torch.full((R, L), -1, dtype=torch.long)}
    keys = {"input_ids": "ids", "position_ids": "pos", "labels": "labels", "sequence_index": "seq",
            "branch": "branch"}
    for r, members in enumerate(rows):
        at = 0
        for k in members:
            g, n = groups[k], len(groups[k]["ids"])
            for name, key in keys.items():
                out[name][r, at:at + n] = torch.tensor(g[key], dtype=torch.long)
            out["group_index"][r, at:at + n] = k
            at += n
        out["position_ids"][r, at:] = torch.arange(L - at)
    return out


def collate_shared_numpy_batch(batch: dict, pad_id: int, max_tokens: int | None = None,
                               pad_to_multiple_of: int = 8) -> dict:
    """A Ray Data numpy batch (object arrays of id lists) -> collate_shared."""
    return collate_shared(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"],
                          pad_id, max_tokens, pad_to_multiple_of)


def shared_attention_mask(group_index, branch, dtype=None, position_ids=None, sliding_window=None):
    """(R, L) group_index and branch -> (R, 1, L, L) dense mask: the reference the
    segment attention is tested against (SDPA / eager through ``attention_mask``).

    Query t may attend to key s when s <= t in the row, both are in the same group,
    and the key's branch is the query's or 0 (P[:-1], shared by both branches). For
    the plain packed layout pass ``group_index=sequence_index`` and a branch of 1 on
    every real token: the block-diagonal mask of ``collate.packed_attention_mask``.
    A padding token attends to itself only. Boolean (True = attend) by default; for a
    float ``dtype`` additive (0 / dtype min). A model with a sliding window (Mistral)
    needs ``position_ids`` and ``sliding_window``: a 4D mask is used as given, so the
    window has to be in it (key positions > query position - window).
    """
    import torch

    R, L = group_index.shape
    same = group_index[:, :, None] == group_index[:, None, :]
    branch_ok = (branch[:, :, None] == branch[:, None, :]) | (branch[:, None, :] == 0)
    causal = torch.ones(L, L, dtype=torch.bool, device=group_index.device).tril()
    real = (group_index >= 0)[:, :, None]
    eye = torch.eye(L, dtype=torch.bool, device=group_index.device)
    allowed = same & branch_ok & causal & real
    if sliding_window is not None:
        allowed &= position_ids[:, :, None] - position_ids[:, None, :] < sliding_window
    mask = (allowed | eye)[:, None]
    if dtype is None or dtype == torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _runs(group, branch, L):
    """Flat (N,) lists -> [(start, end, group, branch)]: maximal runs of one group and
    branch within one row (a row's end always ends a run: padding never joins the
    next row's)."""
    runs, start = [], 0
    for i in range(1, len(group) + 1):
        if i == len(group) or i % L == 0 or group[i] != group[start] or branch[i] != branch[start]:
            runs.append((start, i, group[start], branch[start]))
            start = i
    return runs


def segment_spans(batch: dict) -> tuple[tuple, list[int] | None]:
    """A packed batch (``collate.collate_packed`` or ``collate_shared``) -> (spans, key_index).

    spans: one ``(q0, q1, k0, k1, pad)`` per segment, in token order; queries are the
    flat tokens [q0, q1) of the (R x L) batch (together they cover every token once),
    keys are [k0, k1) of the gathered key order (``key_index``, the flat token of each
    gathered key; None when every segment's keys are its queries, the plain layout).
    ``pad`` marks padding runs. A segment never crosses a row.
    """
    L = batch["input_ids"].shape[-1]
    if "branch" in batch:
        group, branch = batch["group_index"].reshape(-1).tolist(), batch["branch"].reshape(-1).tolist()
    else:  # plain packing: every sequence is a group of one branch
        group = batch["sequence_index"].reshape(-1).tolist()
        branch = [1 if g >= 0 else -1 for g in group]
    spans, key_index, prefix = [], [], None
    for a, b, g, br in _runs(group, branch, L):
        k0 = len(key_index)
        if g < 0:
            key_index.extend(range(a, b))
            spans.append((a, b, k0, len(key_index), True))
        elif br == 0:  # P[:-1]: the chosen segment starts here, the rejected one reads it
            prefix = (g, a, b)
        elif br == 1:
            q0 = prefix[1] if prefix and prefix[0] == g else a
            if prefix and prefix[0] == g and prefix[2] != a:
                raise ValueError("a shared prompt is not followed by its chosen branch")
            key_index.extend(range(q0, b))
            spans.append((q0, b, k0, len(key_index), False))
        elif br == 2:
            if prefix and prefix[0] == g:
                key_index.extend(range(prefix[1], prefix[2]))
            key_index.extend(range(a, b))
            spans.append((a, b, k0, len(key_index), False))
        else:
            raise ValueError(f"unknown branch {br} in a packed batch")
    identity = all(q0 == k0 and q1 == k1 for q0, q1, k0, k1, _ in spans)
    return tuple(spans), None if identity else key_index


def segment_kwargs(batch: dict) -> dict:
    """The model-forward kwargs ``simpo_ray.attention`` reads, for one packed batch
    (either layout), computed once per batch on the host:

    * ``segment_spans``: the spans of ``segment_spans`` (python ints: the CPU loop).
    * ``segment_key_index``: (K,) long flat token of each gathered key, or None.
    * ``segment_cu_q`` / ``segment_cu_k``: (S + 1,) int32 cumulative query / key
      lengths, and ``segment_max_q`` / ``segment_max_k``: the flash-attn varlen
      arguments (padding segments included, as transformers does).

    Pass them with ``position_ids`` and ``attention_mask=None`` to a model switched by
    ``attention.use_segment_attention``.
    """
    import torch

    spans, key_index = segment_spans(batch)
    q_lens = [q1 - q0 for q0, q1, _, _, _ in spans]
    k_lens = [k1 - k0 for _, _, k0, k1, _ in spans]
    cum = lambda xs: torch.tensor([0] + xs, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # noqa: E731
    return {"segment_spans": spans,
            "segment_key_index": None if key_index is None else torch.tensor(key_index, dtype=torch.long),
            "segment_cu_q": cum(q_lens), "segment_cu_k": cum(k_lens),
            "segment_max_q": max(q_lens), "segment_max_k": max(k_lens)}
