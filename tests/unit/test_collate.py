import pytest
import torch

from simpo_ray.collate import IGNORE, collate_pairs


def test_chosen_first_labels_mask_prompt_and_padding_exactly():
    prompts = [[1, 5, 6], [1, 7]]
    chosen = [[10, 11, 2], [12, 2]]
    rejected = [[20, 2], [21, 22, 23, 24, 2]]
    b = collate_pairs(prompts, chosen, rejected, pad_id=0)
    ids, lab, mask = b["input_ids"], b["labels"], b["attention_mask"]
    assert ids.shape == lab.shape == mask.shape == (4, 7)
    # rows 0..1 chosen, rows 2..3 rejected
    assert ids[0].tolist() == [1, 5, 6, 10, 11, 2, 0]
    assert lab[0].tolist() == [IGNORE] * 3 + [10, 11, 2] + [IGNORE]
    assert ids[3].tolist() == [1, 7, 21, 22, 23, 24, 2]
    assert lab[3].tolist() == [IGNORE] * 2 + [21, 22, 23, 24, 2]
    assert mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0]
    # exactly the completion tokens are scored, nothing else
    for i, comp in enumerate(chosen + rejected):
        assert int((lab[i] != IGNORE).sum()) == len(comp)
    assert int(mask.sum()) == sum(len(p) for p in prompts) * 2 + sum(map(len, chosen + rejected))


def test_pad_to_multiple():
    b = collate_pairs([[1]], [[2, 3]], [[4]], pad_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (2, 8)
    assert b["input_ids"].dtype == torch.long


def test_empty_completion_is_refused():
    import pytest

    with pytest.raises(ValueError, match="empty completion"):
        collate_pairs([[1]], [[]], [[4]], pad_id=0)


# ---------------------------------------------------------------- packing
from simpo_ray.collate import (collate_packed, flash_varlen_kwargs, flatten_packed,  # noqa: E402
                               pack_rows, packed_attention_mask, padding_stats, token_budget_batches)


def test_packed_rows_by_hand():
    prompts = [[1, 5, 6], [1, 7]]
    chosen = [[10, 11, 2], [12, 2]]
    rejected = [[20, 2], [21, 22, 23, 24, 2]]
    # sequences (chosen first): 0: 6 tokens, 1: 4, 2 (rejected 0): 5, 3: 7. Rows of 11,
    # first-fit decreasing: 3 opens row 0, 0 opens row 1, 2 joins row 1, 1 joins row 0.
    b = collate_packed(prompts, chosen, rejected, pad_id=0, max_tokens=11, pad_to_multiple_of=1)
    assert b["input_ids"].shape == (2, 11)
    assert b["sequence_index"].tolist() == [[1] * 4 + [3] * 7, [0] * 6 + [2] * 5]
    assert b["input_ids"][1].tolist() == [1, 5, 6, 10, 11, 2] + [1, 5, 6, 20, 2]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3] + list(range(7))
    assert b["labels"][1].tolist() == [IGNORE] * 3 + [10, 11, 2] + [IGNORE] * 3 + [20, 2]
    # padding: pad id, label -100, sequence -1, positions restarting at 0
    c = collate_packed(prompts, chosen, rejected, pad_id=0, max_tokens=16, pad_to_multiple_of=8)
    assert c["input_ids"].shape == (4, 8)  # 2 x 16 would hold the same slots: the shorter rows win
    for r in range(4):
        row = c["sequence_index"][r].tolist()
        n_pad = row.count(-1)
        assert n_pad and row[-n_pad:] == [-1] * n_pad
        assert c["position_ids"][r, -n_pad:].tolist() == list(range(n_pad))
    assert (c["labels"][c["sequence_index"] == -1] == IGNORE).all()
    assert (c["input_ids"][c["sequence_index"] == -1] == 0).all()


def test_packing_keeps_every_token_of_the_padded_batch_exactly_once():
    import random

    rng = random.Random(0)
    P = [[1] + [rng.randrange(6, 200) for _ in range(rng.randint(1, 30))] for _ in range(7)]
    C = [[rng.randrange(6, 200) for _ in range(rng.randint(1, 60))] + [2] for _ in range(7)]
    R = [[rng.randrange(6, 200) for _ in range(rng.randint(1, 90))] + [2] for _ in range(7)]
    padded = collate_pairs(P, C, R, pad_id=0)
    for max_tokens in (128, 256, None):
        b = collate_packed(P, C, R, pad_id=0, max_tokens=max_tokens)
        assert b["input_ids"].shape[1] % 8 == 0
        if max_tokens:
            assert b["input_ids"].shape[1] <= max_tokens
        else:
            assert b["input_ids"].shape[0] == 1
        for k in range(14):
            where = b["sequence_index"] == k
            r = int(where.any(1).nonzero())  # one row holds the whole sequence
            cols = where[r].nonzero().flatten()
            assert cols.tolist() == list(range(int(cols[0]), int(cols[-1]) + 1))  # contiguous
            n = int(padded["attention_mask"][k].sum())
            assert b["input_ids"][r, cols].tolist() == padded["input_ids"][k, :n].tolist()
            assert b["labels"][r, cols].tolist() == padded["labels"][k, :n].tolist()
            assert b["position_ids"][r, cols].tolist() == list(range(n))
        assert padding_stats(b)["tokens"] == padding_stats(padded)["tokens"]
        assert padding_stats(b)["pad_fraction"] < padding_stats(padded)["pad_fraction"]


def test_pack_rows_first_fit_decreasing_and_limits():
    rows, L = pack_rows([5, 3, 3, 2, 7], max_tokens=10, multiple_of=1)
    assert sorted(sum(rows, [])) == [0, 1, 2, 3, 4] and L <= 10
    assert all(sum([5, 3, 3, 2, 7][i] for i in r) <= L for r in rows)
    assert len(rows) * L == 20  # 20 tokens fit 2 rows of 10 exactly
    assert pack_rows([5, 3], None, 8) == ([[0, 1]], 8)
    assert pack_rows([5, 3, 3, 2, 7], 10, 1) == (rows, L)  # deterministic
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([11], max_tokens=10)


def test_packed_attention_mask_is_block_diagonal_and_causal():
    seq = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = packed_attention_mask(seq)[0, 0]
    assert m.dtype == torch.bool and m.shape == (6, 6)
    assert m[1].tolist() == [True, True, False, False, False, False]
    assert m[4].tolist() == [False, False, True, True, True, False]
    assert m[5].tolist() == [False] * 5 + [True]  # padding sees itself only: no NaN
    add = packed_attention_mask(seq, torch.float32)[0, 0]
    assert add[1, 0] == 0 and add[1, 2] == torch.finfo(torch.float32).min


def test_flash_varlen_kwargs_from_position_ids():
    # sequences: 0 = [1,5,7,2], 1 = [1,8,2], 2 = [1,5,9,9,2], 3 = [1,3,2]; rows of 8:
    # first-fit decreasing puts {1, 2} (3 + 5) in one row and {0, 3} (4 + 3) + 1 pad in the other
    b = collate_packed([[1, 5], [1]], [[7, 2], [8, 2]], [[9, 9, 2], [3, 2]], pad_id=0, max_tokens=8)
    assert b["sequence_index"].tolist() == [[1] * 3 + [2] * 5, [0] * 4 + [3] * 3 + [-1]]
    flat = flatten_packed(b)
    assert flat["input_ids"].shape == (1, 16)
    kw = flash_varlen_kwargs(flat["position_ids"])
    assert kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 8, 12, 15, 16]  # the pad is its own segment
    assert kw["max_length_q"] == kw["max_length_k"] == 5


def test_token_budget_batches_keep_order_and_whole_pairs():
    def batch(rows, first):
        return {"prompt_ids": [[1] * p for p, _, _ in rows], "chosen_ids": [[2] * c for _, c, _ in rows],
                "rejected_ids": [[3] * r for _, _, r in rows], "row": list(range(first, first + len(rows)))}

    # pair cost = 2 x prompt + chosen + rejected: 11, 4, 20 | 6, 14
    stream = [batch([(2, 3, 4), (1, 1, 1), (5, 5, 5)], 1), batch([(1, 2, 2), (3, 4, 4)], 4)]
    out = list(token_budget_batches(stream, max_tokens=20))
    assert [b["row"] for b in out] == [[1, 2], [3], [4, 5]]
    assert out[0]["chosen_ids"] == [[2, 2, 2], [2]]
    with pytest.raises(ValueError, match="exceeds the token budget"):
        list(token_budget_batches([batch([(3, 10, 10)], 1)], max_tokens=20))
