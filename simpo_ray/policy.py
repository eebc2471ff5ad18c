"""The module DeepSpeed wraps: a Hugging Face causal LM plus a log-prob head.

``PolicyLogps(lm)(input_ids, attention_mask, labels)`` -> (summed completion log-probs
(N,), completion token counts (N,)). With ``chunk_size > 0`` the lm_head runs through
``chunked_sequence_logps``, so the (N, T, V) logits never exist; it runs inside the
lm_head module's own forward, which is what lets ZeRO-3 gather the partitioned weight
for the forward and again for the backward, and reduce its gradient, exactly as for
a plain Linear call.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from simpo_ray.logps import (chunked_sequence_logps, packed_chunked_sequence_logps, packed_sequence_logps,
                             packed_token_counts, sequence_logps, token_counts)


def supports_chunked_head(config) -> bool:
    """The chunked head computes plain ``h @ W.T (+ b)`` logits; models that transform
    logits after the lm_head (Gemma-2 soft-capping, Cohere's logit scale) use the
    plain path, which runs the model's own forward."""
    if getattr(config, "final_logit_softcapping", None):
        return False
    return getattr(config, "logit_scale", None) in (None, 1, 1.0)


def _head_forward(self, hidden, labels=None, chunk_size: int = 1024, sequence_index=None,
                  num_sequences=None):
    if labels is None:  # generation / plain use: an ordinary Linear
        return F.linear(hidden, self.weight, self.bias)
    if sequence_index is not None:
        return packed_chunked_sequence_logps(hidden, self.weight, labels, sequence_index, num_sequences,
                                             chunk_size=chunk_size, average=False, bias=self.bias)
    return chunked_sequence_logps(hidden, self.weight, labels, chunk_size=chunk_size,
                                  average=False, bias=self.bias)


class PolicyLogps(torch.nn.Module):
    def __init__(self, lm, chunk_size: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size if chunk_size and supports_chunked_head(lm.config) else 0
        if self.chunk_size:
            head = lm.get_output_embeddings()
            head.forward = types.MethodType(_head_forward, head)

    def forward(self, input_ids, attention_mask, labels, sequence_index=None, num_sequences=None,
                **model_kwargs):
        """Padded: input_ids, attention_mask, labels (N, T) -> sums (N,), counts (N,).

        Packed (``collate.collate_packed``): attention_mask None, ``position_ids`` in
        model_kwargs, ``sequence_index`` (R, L) and ``num_sequences`` S -> (S,), (S,).
        ``use_cache=False`` matters there: transformers only derives the block-diagonal
        mask from position_ids when no cache is passed."""
        packed = sequence_index is not None
        counts = (packed_token_counts(labels, sequence_index, num_sequences) if packed
                  else token_counts(labels))
        if not self.chunk_size:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             **model_kwargs).logits
            if packed:
                return packed_sequence_logps(logits, labels, sequence_index, num_sequences, average=False), counts
            return sequence_logps(logits, labels, average=False), counts
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False, **model_kwargs).last_hidden_state
        sums = self.lm.get_output_embeddings()(hidden, labels=labels, chunk_size=self.chunk_size,
                                                sequence_index=sequence_index, num_sequences=num_sequences)
        return sums, counts
