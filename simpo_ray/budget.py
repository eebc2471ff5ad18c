"""The epoch's micro-batches, each rank's share of them, and token-budget batching.

Every rank reads the same global stream of micro-batches (a seeded order that depends on
the data, the seed and the epoch, not on the number of workers) and trains every
``world``-th one (``rank_micro``). Position is kept in global micro-batches, so a run
can resume on another number of workers without skipping or repeating a pair: an
optimizer step is always the next ``total_batch_size / micro_batch_size`` micro-batches.

Budget micro-batches (``data.token_budget``) hold a data-dependent number of whole
pairs; every rank counts the same global stream once per epoch, so all ranks agree on
the steps without negotiating, and the pairs of each step let the loss be a mean over
all of them (``loss_scale``).
"""

from __future__ import annotations


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
