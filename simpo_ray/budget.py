"""The epoch's micro-batches, each rank's share of them, and token-budget batching.

Every rank reads the same global stream of micro-batches (a seeded order that depends on
the data, the seed and the epoch, not on the number of workers) and trains every
``world``-th one (``rank_micro``). Position is kept in global micro-batches, so a run
can resume on another number of workers without skipping or repeating a pair: an
optimizer step is always the next ``total_batch_size / micro_batch_size`` micro-batches.

Budget micro-batches (``data.token_budget``) hold a data-dependent number of whole
pairs; every rank counts the same global stream once per epoch, so all ranks agree on
the steps without negotiating, and the pairs of each step let the loss be a mean over
all of them (``loss_scale``). The driver's plan (``make_plan``: steps per epoch, the
resolved budget, the packed layout) is made here too.
"""

from __future__ import annotations


def auto_token_budget(micro_batch_size: int, mean_cost: float, largest: int) -> int:
    """``data.token_budget: auto``: the nominal micro-batch on average (a greedy cut
    leaves about half a pair's room unused, so micro_batch_size + 1/2 mean pairs), rounded
    up to 8 tokens, and never below the largest pair."""
    return max(-(-round((micro_batch_size + 0.5) * mean_cost) // 8) * 8, largest)


def make_plan(cfg, stats: dict, pad_id: int, has_eval: bool, run_dir: str = "", model_config=None):
    """The RunPlan: steps and other facts every worker needs, computed once on the
    driver. ``model_config``: the model's config.json (the packed layout depends on it)."""
    from simpo_ray.collate import packed_layout
    from simpo_ray.runplan import RunPlan
    from simpo_ray.sources import DataError

    t = cfg.train
    layout = packed_layout(cfg.data, cfg.model.attn_implementation, model_config or {})
    pairs_per_micro, budget = t.micro_batch_size, None
    if cfg.data.token_budget:
        # Micro-batches are cut by tokens: the workers count the exact steps of every
        # epoch before training (simpo_ray.budget); this estimate only sizes the
        # driver's plan line and a sweep's ASHA horizon.
        cost = stats.get("mean_pair_tokens") or 1
        if layout["share_prompt"]:  # the prompt once, plus one token
            cost -= (stats.get("mean_prompt_tokens") or 1) - 1
        budget = cfg.data.token_budget
        if budget == "auto":
            largest = (stats.get("max_pair_tokens") or [1, 1])[1 if layout["share_prompt"] else 0]
            budget = auto_token_budget(t.micro_batch_size, cost, largest)
        pairs_per_micro = max(1, budget // max(1, round(cost)))
    # One global stream of micro-batches (drop_last); a step is the next
    # grad_accum_steps x num_workers of them, whatever the number of workers.
    steps_per_epoch = stats["train_pairs"] // pairs_per_micro // (t.grad_accum_steps * t.num_workers)
    if steps_per_epoch == 0:
        raise DataError(
            f"{stats['train_pairs']} training pairs are fewer than one optimizer step needs "
            f"(train.total_batch_size={t.total_batch_size}"
            + (f", token budget {budget}" if budget else "")
            + "); lower it or add data")
    total = steps_per_epoch * t.epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    return RunPlan(steps_per_epoch=steps_per_epoch, total_steps=total, has_eval=has_eval, pad_id=pad_id, **layout,
                   token_budget=budget,
                   run_dir=run_dir or str(cfg.output.run_dir),
                   stats={k: v for k, v in stats.items() if k != "files"},
                   unused_pairs_per_epoch=stats["train_pairs"] - steps_per_epoch * t.total_batch_size)


def iter_train(shard, cfg, epoch: int):
    """The epoch's global stream of batches of ``micro_batch_size`` pairs, in a seeded
    order a resume reproduces (``shard`` is the whole dataset on every rank)."""
    from simpo_ray.data import shuffle_args

    mb = cfg.train.micro_batch_size
    return shard.iter_batches(batch_size=mb, batch_format="numpy", drop_last=True,
                              **shuffle_args(cfg.data, epoch, mb))


def iter_micro(shard, cfg, epoch: int, plan):
    """The epoch's global micro-batches: ``micro_batch_size`` pairs, or with a token
    budget (``plan.token_budget``) as many whole pairs as fit it (same order; a pair
    costs what it takes packed, its prompt once with ``plan.share_prompt``)."""
    batches = iter_train(shard, cfg, epoch)
    if not plan.token_budget:
        return batches
    from simpo_ray.collate import token_budget_batches

    return token_budget_batches(batches, plan.token_budget, share_prompt=plan.share_prompt)


def rank_micro(stream, start: int, rank: int, world: int):
    """This rank's share of the global micro-batches after the first ``start``:
    (global index g, 1-based; batch) for g = start + rank + 1, then every ``world``-th.
    A round of ``world`` micro-batches (one per rank) ends at ``start + n * world``."""
    for g, batch in enumerate(stream, start=1):
        if g > start and (g - start - 1) % world == rank:
            yield g, batch


def schedule(shard, cfg, world: int, plan) -> list:
    """The global number of pairs in every optimizer step of every epoch the run reaches
    (``train.max_steps`` may end it early), as ``[[pairs of step 1, ...] per epoch]``: a step is ``grad_accum_steps x world``
    consecutive global micro-batches. Every rank counts the same stream; a collective
    check refuses to train if two ranks saw different streams."""
    import torch
    import torch.distributed as dist

    per_step = cfg.train.grad_accum_steps * world
    out = []
    for epoch in range(cfg.train.epochs):
        sizes = [len(b["prompt_ids"]) for b in iter_micro(shard, cfg, epoch, plan)]
        out.append([sum(sizes[i:i + per_step]) for i in range(0, len(sizes) // per_step * per_step, per_step)])
        if cfg.train.max_steps and sum(len(s) for s in out) >= cfg.train.max_steps:
            break  # the run ends in this epoch: later epochs are never read
    mine = torch.tensor([sum(len(s) for s in out), sum(map(sum, out))], dtype=torch.long)
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"workers read different data streams (steps, pairs from {low.tolist()} to "
                           f"{high.tolist()}); the order must not depend on the worker")
    return out


def counted_plan(plan, epoch_steps: list, cfg, rank: int):
    """The driver's estimate replaced by the counted steps (a RunPlan)."""
    t = cfg.train
    plan = plan.counted(epoch_steps, t.max_steps)
    if plan.total_steps == 0:
        raise ValueError(f"token budget {plan.token_budget} (data.token_budget={cfg.data.token_budget}): not one optimizer step of "
                         f"{t.grad_accum_steps} micro-batches fits in an epoch on every rank; "
                         "lower train.total_batch_size or add data")
    if rank == 0:
        n = len(epoch_steps[0])
        print(f"[simpo-ray] token budget {plan.token_budget}: {n} steps in epoch 0 "
              f"(about {sum(epoch_steps[0]) / max(n, 1):.1f} pairs per step), {plan.total_steps} steps in all",
              flush=True)
    return plan


def loss_scale(pairs: int, world: int, grad_accum: int, step_pairs: int) -> float:
    """Factor turning a micro-batch's mean loss into its share of the mean over the
    step's ``step_pairs`` pairs on all ranks. DeepSpeed divides by ``grad_accum`` and
    averages over ``world`` ranks, hence the two factors back."""
    return pairs * world * grad_accum / max(step_pairs, 1)


def micro_batches_per_epoch(epoch_steps, steps_per_epoch: int, t) -> list:
    """Global micro-batches the steps of each epoch use: the counted steps (token
    budget) or the plan's fixed steps, times ``total_batch_size / micro_batch_size``
    (the same for any number of workers)."""
    steps = [len(s) for s in epoch_steps] if epoch_steps else [steps_per_epoch] * t.epochs
    return [n * t.grad_accum_steps * t.num_workers for n in steps]


def step_pairs(epoch_schedule: list, g: int, per_step: int) -> int:
    """Global pairs of the step that global micro-batch ``g`` (1-based) belongs to, a
    step being ``per_step`` micro-batches. A dropped non-finite round shifts the window;
    the last step's count serves."""
    return epoch_schedule[min((g - 1) // per_step, len(epoch_schedule) - 1)]
