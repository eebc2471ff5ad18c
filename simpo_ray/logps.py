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


# fp32 elements of one lm_head slice when the weight is in low precision: 64 Mi
# (256 MiB; 8192 vocab rows at hidden 8192), instead of a float32 copy of all of it.
VOCAB_SLICE_ELEMENTS = 1 << 26


def _vocab_slice(weight: Tensor, dtype: torch.dtype) -> int:
    """Vocab rows per slice: all of them when the weight already has the compute dtype
    (no copy is made), else enough for ``VOCAB_SLICE_ELEMENTS`` float32 elements."""
    if weight.dtype == dtype:
        return weight.shape[0]
    return max(1, min(weight.shape[0], VOCAB_SLICE_ELEMENTS // max(weight.shape[1], 1)))


class _ChunkedLinearLogp(torch.autograd.Function):
    """log softmax(h @ W.T + b)[y] for M scored positions, block by block.

    forward(hidden (M, H), weight (V, H), bias (V,) or None, labels (M,), chunk_size,
    vocab_slice) -> (M,) token log-probs. Blocks are (chunk_size rows) x (vocab_slice
    columns); the logsumexp runs online across vocab slices (running max and sum), and
    only the (M,) logsumexp is kept. Backward recomputes each block's logits. With
    g = d out / d logits = grad_out * (onehot(y) - softmax): grad_hidden = g @ W,
    grad_W = g.T @ h, grad_b = sum of g, each block adding its share.

    Math is float32 (float64 stays float64). A low-precision W is converted one vocab
    slice at a time, and its gradient accumulated per slice in float32, so the extra
    memory is one (chunk, slice) buffer plus two float32 slices, never a float32 copy
    of the whole lm_head (4 V H bytes each: 4 GiB at vocab 128k, hidden 8k).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, vocab_slice):  # type: ignore[override]
        dtype = _compute_dtype(hidden.dtype, weight.dtype)
        M, V = hidden.shape[0], weight.shape[0]
        run_max = torch.full((M,), float("-inf"), dtype=dtype, device=hidden.device)
        run_sum = torch.zeros(M, dtype=dtype, device=hidden.device)
        label_logit = torch.zeros(M, dtype=dtype, device=hidden.device)
        for v0 in range(0, V, vocab_slice):
            w, b = _slice(weight, bias, v0, vocab_slice, dtype)
            for start in range(0, M, chunk_size):
                end = start + chunk_size
                logits = _chunk_logits(hidden[start:end].to(dtype), w, b)
                local, hit = _local_labels(labels[start:end], v0, w.shape[0])
                label_logit[start:end] += logits.gather(1, local[:, None]).squeeze(1).masked_fill_(~hit, 0)
                m_old = run_max[start:end]
                m_new = torch.maximum(m_old, logits.amax(dim=1))
                # In place: the block's logits are not needed after this.
                block = logits.sub_(m_new[:, None]).exp_().sum(dim=1)
                run_sum[start:end] = run_sum[start:end] * torch.exp(m_old - m_new) + block
                run_max[start:end] = m_new
                del logits  # else the next block's buffer is allocated while this one lives
        lse = run_max + run_sum.log()
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size, ctx.vocab_slice = chunk_size, vocab_slice
        return label_logit - lse

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, V = lse.dtype, weight.shape[0]
        grad_out = grad_out.to(dtype)
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        same = weight.dtype == dtype  # accumulate straight into the result, no slice buffer
        grad_w = (torch.zeros_like(weight) if same else torch.empty_like(weight)) if need_w else None
        grad_b = (torch.zeros_like(bias) if bias.dtype == dtype else torch.empty_like(bias)) if need_b else None
        for v0 in range(0, V, ctx.vocab_slice):
            w, b = _slice(weight, bias, v0, ctx.vocab_slice, dtype)
            v1 = v0 + w.shape[0]
            gw = (grad_w[v0:v1] if same else torch.zeros(w.shape, dtype=dtype, device=w.device)) if need_w else None
            gb = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if need_b else None
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                end = start + ctx.chunk_size
                h = hidden[start:end].to(dtype)
                go = grad_out[start:end]
                local, hit = _local_labels(labels[start:end], v0, w.shape[0])
                # softmax, then g = go * (onehot - softmax), all in the one buffer.
                g = _chunk_logits(h, w, b).sub_(lse[start:end, None]).exp_().mul_(-go[:, None])
                g.scatter_add_(1, local[:, None], (go * hit)[:, None])
                if need_h:
                    grad_h[start:end] += g @ w
                if need_w:
                    gw.addmm_(g.t(), h)
                if need_b:
                    gb += g.sum(dim=0)
                del g
            if need_w and not same:
                grad_w[v0:v1] = gw.to(weight.dtype)
            if need_b:
                grad_b[v0:v1] = gb.to(bias.dtype)
        if need_h:
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _slice(weight: Tensor, bias: Optional[Tensor], v0: int, n: int, dtype: torch.dtype):
    """Rows [v0, v0 + n) of the head in the compute dtype (a view when it already is)."""
    w = weight[v0:v0 + n].to(dtype)
    return w, (bias[v0:v0 + n].to(dtype) if bias is not None else None)


def _local_labels(labels: Tensor, v0: int, n: int):
    """Labels as columns of the slice [v0, v0 + n) (clamped), and which fall in it."""
    local = labels - v0
    hit = (local >= 0) & (local < n)
    return local.clamp_(0, n - 1), hit


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
    vocab_slice: Optional[int] = None,
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
        vocab_slice: vocab rows per block (default: all for a float32 weight; for a
            bf16 one, slices of ``VOCAB_SLICE_ELEMENTS`` float32 elements).

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
    if vocab_slice is not None and (isinstance(vocab_slice, bool) or not isinstance(vocab_slice, int)
                                    or vocab_slice < 1):
        raise ValueError(f"vocab_slice must be an int >= 1 or None, got {vocab_slice!r}")
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
    token_logps = _ChunkedLinearLogp.apply(h, weight, bias, shifted[rows, cols].long(), chunk_size,
                                           vocab_slice or _vocab_slice(weight, _compute_dtype(hidden.dtype, weight.dtype)))
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
                                  bias: Optional[Tensor] = None, vocab_slice: Optional[int] = None) -> Tensor:
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
    token_logps = _ChunkedLinearLogp.apply(h, weight, bias, labels[:, 1:][rows, cols].long(), chunk_size,
                                           vocab_slice or _vocab_slice(weight, _compute_dtype(hidden.dtype, weight.dtype)))
    sums = token_logps.new_zeros(num_sequences).index_add(0, ids, token_logps)
    return sums / counts.to(sums.dtype) if average else sums
