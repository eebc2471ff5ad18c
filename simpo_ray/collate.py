"""Triplets -> one padded batch: chosen first, then rejected, in one forward.

Pure functions of lists of ids; no Ray. Shapes: with B pairs and longest sequence T,
``input_ids``, ``attention_mask`` and ``labels`` are (2B, T); rows [0, B) are the
chosen sequences and rows [B, 2B) the rejected ones. ``labels`` is -100 on the
prompt and on padding, so only completion tokens are scored.
"""

from __future__ import annotations

from typing import Sequence

IGNORE = -100


def collate_pairs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                  rejected_ids: Sequence[Sequence[int]], pad_id: int,
                  pad_to_multiple_of: int = 1) -> dict:
    import torch

    seqs, labels = [], []
    for completions in (chosen_ids, rejected_ids):
        for p, c in zip(prompt_ids, completions):
            p, c = list(p), list(c)
            if not c:
                raise ValueError("a pair with an empty completion reached collate")
            seqs.append(p + c)
            labels.append([IGNORE] * len(p) + c)
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
