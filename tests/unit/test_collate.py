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
