"""Token-budget batching in the worker: micro-batches cut by tokens, and a loss
scale that makes every optimizer step a mean over all of its pairs on all ranks."""

import math
import random

import numpy as np
import pytest

from simpo_ray.config import RunConfig
from simpo_ray.budget import iter_micro
from simpo_ray.runplan import RunPlan
from simpo_ray.budget import loss_scale as budget_loss_scale


def _batches(lengths, per_batch):
    """Ray-Data-like numpy batches of pairs with the given (prompt, chosen, rejected) lengths."""
    out = []
    for i in range(0, len(lengths), per_batch):
        part = lengths[i:i + per_batch]
        col = lambda k: np.array([np.arange(n[k]) for n in part] + [None], dtype=object)[:-1]  # noqa: E731
        out.append({"prompt_ids": col(0), "chosen_ids": col(1), "rejected_ids": col(2),
                    "row": np.arange(i, i + len(part))})
    return out


class _Shard:
    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, **kw):
        return iter(self.batches)


def test_micro_batches_fill_the_budget_with_whole_pairs_in_order():
    rng = random.Random(0)
    lengths = [(rng.randint(5, 60), rng.randint(1, 200), rng.randint(1, 200)) for _ in range(50)]
    cfg = RunConfig.from_dict({"data": {"train_files": ["x"], "max_length": 256, "max_prompt_length": 64,
                                        "token_budget": 600, "shuffle": False},
                               "train": {"micro_batch_size": 4, "total_batch_size": 8, "num_workers": 1}})
    plan = RunPlan(steps_per_epoch=1, total_steps=1, has_eval=False, pad_id=0, run_dir="", token_budget=600)
    micro = list(iter_micro(_Shard(_batches(lengths, 4)), cfg, 0, plan))
    rows = [r for m in micro for r in m["row"]]
    assert rows == list(range(50))  # order kept, nothing lost
    costs = [sum(2 * p + c + r for p, c, r in (lengths[i] for i in m["row"])) for m in micro]
    assert all(c <= 600 for c in costs)
    # greedy: the next pair would not have fitted
    for m, c in zip(micro[:-1], costs):
        nxt = lengths[m["row"][-1] + 1]
        assert c + 2 * nxt[0] + nxt[1] + nxt[2] > 600
    shared = list(iter_micro(_Shard(_batches(lengths, 4)), cfg, 0, RunPlan(**{**plan.to_dict(), "share_prompt": True})))
    assert [r for m in shared for r in m["row"]] == list(range(50)) and len(shared) < len(micro)  # the prompt once
    assert all(sum(p + c + 1 + r for p, c, r in (lengths[i] for i in m["row"])) <= 600 for m in shared)
    plain = RunPlan(**{**plan.to_dict(), "token_budget": None})
    assert [len(b["row"]) for b in iter_micro(_Shard(_batches(lengths, 4)), cfg, 0, plain)] == [4] * 12 + [2]


@pytest.mark.parametrize("world,gas", [(1, 1), (2, 2), (3, 4)])
def test_loss_scale_makes_each_step_a_mean_over_all_its_pairs(world, gas):
    """DeepSpeed backpropagates loss / gas on each rank and averages gradients over
    ranks; with the scale, that sum equals the mean of the per-pair losses of the whole
    step (a linear stand-in for the gradient, which is linear in the loss)."""
    rng = np.random.default_rng(world * 10 + gas)
    micro = [[rng.normal(size=rng.integers(1, 9)) for _ in range(gas)] for _ in range(world)]
    step_pairs = sum(len(m) for rank in micro for m in rank)
    applied = sum(budget_loss_scale(len(m), world, gas, step_pairs) * m.mean() / gas
                  for rank in micro for m in rank) / world
    assert math.isclose(applied, np.concatenate([m for rank in micro for m in rank]).mean(), rel_tol=1e-12)


def test_fixed_micro_batches_are_the_budget_special_case():
    """Equal micro-batches everywhere: the scale is 1, i.e. the usual mean of means."""
    assert budget_loss_scale(4, 2, 3, 4 * 2 * 3) == 1.0


@pytest.mark.parametrize("world,start", [(1, 0), (2, 0), (3, 0), (2, 5), (3, 7)])
def test_ranks_share_the_global_stream_from_any_position(world, start):
    """Each rank trains every ``world``-th global micro-batch after the first ``start``:
    together the ranks see each later micro-batch exactly once, a round (one per rank)
    holds consecutive micro-batches, and the count per epoch does not depend on the
    number of workers."""
    from simpo_ray.budget import micro_batches_per_epoch, rank_micro

    stream = list(range(1, 31))
    shares = [list(rank_micro(iter(stream), start, r, world)) for r in range(world)]
    assert sorted(g for share in shares for g, _ in share) == stream[start:]
    assert all(g == batch for share in shares for g, batch in share)
    rounds = list(zip(*shares))
    assert all([g for g, _ in rnd] == list(range(rnd[0][0], rnd[0][0] + world)) for rnd in rounds)
    per_epoch = {w: micro_batches_per_epoch(None, 5, RunConfig.from_dict(
        {"data": {"train_files": ["x"]}, "train": {"micro_batch_size": 2, "total_batch_size": 12,
                                                  "num_workers": w, "epochs": 2}}).train) for w in (1, 2, 3, 6)}
    assert set(map(tuple, per_epoch.values())) == {(30, 30)}


def test_auto_budget_keeps_the_nominal_batch_and_the_layout_follows_the_model():
    """data.token_budget: auto = (micro_batch_size + 1/2) x the mean packed pair (the
    prompt once when shared), rounded up to 8, at least the largest pair; the packed
    layout (shared prompt, attention per segment) only where it is exact."""
    from simpo_ray.budget import make_plan

    def plan(data=None, model=None, config=None):
        cfg = RunConfig.from_dict({"data": {"train_files": ["x"], "max_length": 256, "max_prompt_length": 64,
                                            **(data or {})}, "model": model or {},
                                   "train": {"micro_batch_size": 4, "total_batch_size": 8, "num_workers": 1}})
        stats = {"train_pairs": 400, "mean_pair_tokens": 100.0, "mean_prompt_tokens": 20.0,
                 "max_pair_tokens": [300, 281]}
        return make_plan(cfg, stats, 0, False, "/tmp/run", model_config=config)

    p = plan()
    assert (p.share_prompt, p.segment_attention, p.token_budget) == (True, True, 368)  # 4.5 x 81 = 364.5
    assert plan({"share_prompt": False}).token_budget == 456  # 4.5 x 100, unshared
    assert plan({"token_budget": 2000}).token_budget == 2000 and plan({"token_budget": None}).token_budget is None
    assert plan({"share_prompt": False}, config=None).segment_attention  # per-sequence attention without sharing
    capped = plan(config={"model_type": "gemma2", "attn_logit_softcapping": 50.0})
    assert (capped.share_prompt, capped.segment_attention, capped.token_budget) == (False, False, 456)
    flash = plan(model={"attn_implementation": "flash_attention_2"})
    assert (flash.share_prompt, flash.segment_attention) == (False, False)
    padded = plan({"packing": False})
    assert (padded.share_prompt, padded.segment_attention) == (False, False)
    with pytest.raises(Exception, match="data.share_prompt"):
        plan({"packing": False, "share_prompt": True})
    with pytest.raises(Exception, match="data.token_budget"):
        plan({"token_budget": "max"})
