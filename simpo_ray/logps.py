"""Per-sequence completion log-probs from logits or from final hidden states.

Pure functions of tensors. Conventions shared by every function here:

* ``labels`` (B, T) hold the input ids with ``IGNORE_INDEX`` (-100) on prompt and
  padding; the shift happens inside: logits at position t predict labels[t + 1], so
  labels[:, 0] is never scored.
* ``average=True`` returns (1/|y|) sum_t log pi(y_t | x, y_<t), the SimPO score
  (Eq. (3)-(4) of arXiv 2405.14734), with |y| = number of non-ignored labels after
  the shift; ``average=False`` returns the sum (what DPO, CPO and R-DPO use).
* A row with no completion tokens raises ValueError (it would be 0/0).
* Math is float32 (float64 stays float64) whatever the input dtype; results are
  float32 (or float64).

``chunked_sequence_logps`` gives the same numbers from hidden states and the lm_head
weight without ever building the (B, T, V) logits: at vocab 128k and 4k tokens
those logits are 2 GiB in float32, plus as much again for their gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor
IGNORE_INDEX = -100


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def token_counts(labels: Tensor) -> Tensor:
    """(B,) int64 number of completion tokens per row after the shift.

    This is |y| in the SimPO average (labels[:, 0] is never predicted, so it does
    not count even when it is not -100).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, T), got {tuple(labels.shape)}")
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def _check_shifted_labels(shifted: Tensor, vocab_size: int) -> Tuple[Tensor, Tensor]:
    """Validate shifted labels (B, T-1); return (mask, counts)."""
    mask = shifted != IGNORE_INDEX
    counts = mask.sum(-1)
    out_of_range = mask & ((shifted < 0) | (shifted >= vocab_size))
    # One host sync for both checks.
    bad_label, empty_row = torch.stack([out_of_range.any(), (counts == 0).any()]).tolist()
    if bad_label:
        values = sorted(set(shifted[out_of_range].tolist()))[:5]
        raise ValueError(
            f"labels must be {IGNORE_INDEX} or in [0, {vocab_size}); found {values}"
        )
    if empty_row:
        rows = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {rows} have no completion tokens after the shift (every label is "
            f"{IGNORE_INDEX}); their average log-prob would be 0/0. Drop or truncate "
            "such pairs before batching."
        )
    return mask, counts


def sequence_logps(logits: Tensor, labels: Tensor, average: bool = True) -> Tensor:
    """Per-sequence completion log-prob from full logits.

    Args:
        logits: (B, T, V), any float dtype.
        labels: (B, T) int, -100 = ignore.
        average: divide by the number of completion tokens (SimPO) or return the sum.

    Returns: (B,) float32 (float64 for float64 logits).

    log pi(y_t) = logits[t, y_t] - logsumexp(logits[t]): only the label logit is
    gathered, never a full log-softmax. Low-precision logits are upcast one row
    at a time, so the float32 copy is (T, V), not (B, T, V).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            "expected logits (B, T, V) and labels (B, T), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    logits = logits[:, :-1]
    shifted = labels[:, 1:]
    mask, counts = _check_shifted_labels(shifted, logits.shape[-1])
    dtype = _compute_dtype(logits.dtype)
    safe = shifted.masked_fill(~mask, 0).long()
    label_logits = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).to(dtype)
    if logits.dtype == dtype:
        lse = torch.logsumexp(logits, dim=-1)
    else:
        lse = torch.stack([torch.logsumexp(row.to(dtype), dim=-1) for row in logits])
    # where, not multiply: whatever sits at ignored positions (even inf) stays out.
    token_logps = torch.where(mask, label_logits - lse, torch.zeros_like(lse))
    sums = token_logps.sum(-1)
    return sums / counts.to(dtype) if average else sums


class _ChunkedLinearLogp(torch.autograd.Function):
    """log softmax(h @ W.T + b)[y] for M scored positions, chunk by chunk.

    forward(hidden (M, H), weight (V, H), bias (V,) or None, labels (M,), chunk_size)
    -> (M,) token log-probs. Only the (M,) logsumexp is kept; backward recomputes
    each chunk's logits. With g = d out / d logits = grad_out * (onehot(y) - softmax):
    grad_hidden = g @ W, grad_W = sum over chunks of g.T @ h, grad_b = sum of g.
    Peak extra memory is one (chunk, V) buffer plus a float32 copy of W (and of
    grad_W) when W is in low precision.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):  # type: ignore[override]
        dtype = _compute_dtype(hidden.dtype, weight.dtype)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        token_logps = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        lse = torch.empty_like(token_logps)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = _chunk_logits(hidden[start:end].to(dtype), w, b)
            label_logit = logits.gather(1, labels[start:end, None]).squeeze(1)
            m = logits.amax(dim=1)
            # In place: the chunk's logits are not needed after this.
            chunk_lse = logits.sub_(m[:, None]).exp_().sum(dim=1).log_().add_(m)
            lse[start:end] = chunk_lse
            token_logps[start:end] = label_logit - chunk_lse
            del logits  # else the next chunk's buffer is allocated while this one lives
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size = chunk_size
        return token_logps

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = lse.dtype
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_out = grad_out.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h = hidden[start:end].to(dtype)
            go = grad_out[start:end]
            # softmax, then g = go * (onehot - softmax), all in the one buffer.
            g = _chunk_logits(h, w, b).sub_(lse[start:end, None]).exp_().mul_(-go[:, None])
            g.scatter_add_(1, labels[start:end, None], go[:, None])
            if need_h:
                grad_h[start:end] = (g @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.t(), h)
            if need_b:
                grad_b += g.sum(dim=0)
            del g
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def _chunk_logits(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return h @ w.t() if b is None else torch.addmm(b, h, w.t())


def chunked_sequence_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    average: bool = True,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``sequence_logps(hidden @ weight.T + bias, labels, average)`` without the logits.

    Args:
        hidden: (B, T, H) final hidden states (after the final norm), float32,
            bfloat16 or float64.
        weight: (V, H) lm_head weight (the tied embedding works too).
        labels: (B, T) int, -100 = ignore; shifted inside, as in ``sequence_logps``.
        chunk_size: scored positions per chunk; peak extra memory ~ chunk_size * V
            floats. Ignored positions are skipped, not computed.
        average: per-token average (SimPO) or sum.
        bias: optional (V,) lm_head bias.

    Returns: (B,) float32 (float64 for float64 inputs), differentiable with
    respect to hidden, weight and bias.
    """
    if hidden.dim() != 3 or weight.dim() != 2 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            "expected hidden (B, T, H), weight (V, H), labels (B, T), got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden size {hidden.shape[2]} != weight.shape[1] {weight.shape[1]}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    B, T, H = hidden.shape
    shifted = labels[:, 1:]
    mask, counts = _check_shifted_labels(shifted, weight.shape[0])
    rows, cols = mask.nonzero(as_tuple=True)
    # Position t of row b predicts labels[b, t + 1]; index the unshifted (B*T, H)
    # view so no (B, T-1, H) copy is made.
    h = hidden.reshape(B * T, H).index_select(0, rows * T + cols)
    token_logps = _ChunkedLinearLogp.apply(h, weight, bias, shifted[rows, cols].long(), chunk_size)
    sums = token_logps.new_zeros(B).index_add(0, rows, token_logps)
    return sums / counts.to(sums.dtype) if average else sums


# ---------------------------------------------------------------- packed rows
def _check_packed(labels: Tensor, sequence_index: Tensor, num_sequences: int, vocab_size: int):
    """Shifted (mask, sequence ids of scored labels, counts per sequence)."""
    if labels.dim() != 2 or sequence_index.shape != labels.shape:
        raise ValueError("expected labels and sequence_index of the same shape (R, L), got "
                         f"{tuple(labels.shape)} and {tuple(sequence_index.shape)}")
    shifted, seq = labels[:, 1:], sequence_index[:, 1:]
    mask = shifted != IGNORE_INDEX
    ids = seq[mask]
    bad_seq = ((ids < 0) | (ids >= num_sequences)).any()
    out_of_range = mask & ((shifted < 0) | (shifted >= vocab_size))
    counts = torch.bincount(ids.clamp(0, max(num_sequences - 1, 0)), minlength=num_sequences)[:num_sequences]
    bad_seq, bad_label, empty = torch.stack([bad_seq, out_of_range.any(), (counts == 0).any()]).tolist()
    if bad_seq:
        raise ValueError(f"scored labels must carry a sequence_index in [0, {num_sequences})")
    if bad_label:
        raise ValueError(f"labels must be {IGNORE_INDEX} or in [0, {vocab_size})")
    if empty:
        raise ValueError(f"sequences {(counts == 0).nonzero().flatten().tolist()} have no completion "
                         "tokens; their average log-prob would be 0/0")
    return mask, ids, counts


def packed_token_counts(labels: Tensor, sequence_index: Tensor, num_sequences: int) -> Tensor:
    """(num_sequences,) int64 completion tokens per packed sequence: |y| of each one."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return torch.bincount(sequence_index[:, 1:][mask], minlength=num_sequences)[:num_sequences]


def packed_sequence_logps(logits: Tensor, labels: Tensor, sequence_index: Tensor,
                          num_sequences: int, average: bool = True) -> Tensor:
    """``sequence_logps`` for packed rows: one value per sequence, not per row.

    Args:
        logits: (R, L, V), any float dtype.
        labels: (R, L), -100 on prompts and padding (``collate.collate_packed``).
        sequence_index: (R, L), the sequence each token belongs to (-1 on padding).
        num_sequences: S, the number of sequences (2B for B pairs).
        average: per-token average (SimPO) or sum.

    Returns: (S,) float32 (float64 for float64 logits), in sequence order. The
    token at t predicts labels[t + 1] and counts for sequence_index[t + 1]; every
    sequence starts with a prompt token (-100), so nothing is scored across a
    boundary and each sequence gets exactly the numbers of its padded row.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits (R, L, V) matching labels (R, L), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    mask, ids, counts = _check_packed(labels, sequence_index, num_sequences, logits.shape[-1])
    dtype = _compute_dtype(logits.dtype)
    scored = logits[:, :-1][mask]  # (M, V): only the scored positions
    targets = labels[:, 1:][mask].long()
    token_logps = scored.gather(-1, targets[:, None]).squeeze(-1).to(dtype) - \
        torch.logsumexp(scored.to(dtype), dim=-1)
    sums = token_logps.new_zeros(num_sequences).index_add(0, ids, token_logps)
    return sums / counts.to(dtype) if average else sums


def packed_chunked_sequence_logps(hidden: Tensor, weight: Tensor, labels: Tensor,
                                  sequence_index: Tensor, num_sequences: int, *,
                                  chunk_size: int = 1024, average: bool = True,
                                  bias: Optional[Tensor] = None) -> Tensor:
    """``packed_sequence_logps(hidden @ weight.T + bias, ...)`` without the logits
    (the chunked head of ``chunked_sequence_logps``, summed per sequence).

    hidden (R, L, H), weight (V, H), labels and sequence_index (R, L) -> (S,).
    """
    if hidden.dim() != 3 or weight.dim() != 2 or labels.shape != hidden.shape[:2]:
        raise ValueError("expected hidden (R, L, H), weight (V, H), labels (R, L), got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    R, L, H = hidden.shape
    mask, ids, counts = _check_packed(labels, sequence_index, num_sequences, weight.shape[0])
    rows, cols = mask.nonzero(as_tuple=True)
    h = hidden.reshape(R * L, H).index_select(0, rows * L + cols)
    token_logps = _ChunkedLinearLogp.apply(h, weight, bias, labels[:, 1:][rows, cols].long(), chunk_size)
    sums = token_logps.new_zeros(num_sequences).index_add(0, ids, token_logps)
    return sums / counts.to(sums.dtype) if average else sums
