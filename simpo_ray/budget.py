"""Micro-batches of one epoch, and token-budget batching (``data.token_budget``).

Budget micro-batches hold a data-dependent number of whole pairs, so ranks would run
different numbers of forwards (a ZeRO-3 hang). Each rank counts its own stream once
per epoch (the order is seeded, so the training pass sees the same batches); the ranks
then agree to take the steps every rank can fill, and sum the pairs of each step so
the loss can be a mean over all of them (``loss_scale``).
"""

from __future__ import annotations


def iter_train(shard, cfg, epoch: int):
    """This rank's batches of ``micro_batch_size`` pairs for one epoch, in a seeded
    order a resume reproduces."""
    from simpo_ray.data import shuffle_args

    mb = cfg.train.micro_batch_size
    return shard.iter_batches(batch_size=mb, batch_format="numpy", drop_last=True,
                              **shuffle_args(cfg.data, epoch, mb))


def iter_micro(shard, cfg, epoch: int):
    """The micro-batches of one epoch: ``micro_batch_size`` pairs, or with
    ``data.token_budget`` as many whole pairs as fit the budget (same order)."""
    batches = iter_train(shard, cfg, epoch)
    if not cfg.data.token_budget:
        return batches
    from simpo_ray.collate import token_budget_batches

    return token_budget_batches(batches, cfg.data.token_budget)


def schedule(shard, cfg) -> list:
    """The global number of pairs in every optimizer step of every epoch, as
    ``[[pairs of step 1, ...] per epoch]``. Collective: every rank calls it."""
    import torch
    import torch.distributed as dist

    gas = cfg.train.grad_accum_steps
    out = []
    for epoch in range(cfg.train.epochs):
        sizes = [len(b["prompt_ids"]) for b in iter_micro(shard, cfg, epoch)]
        local = [sum(sizes[i:i + gas]) for i in range(0, len(sizes) // gas * gas, gas)]
        n = torch.tensor([len(local)])
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        pairs = torch.tensor(local[:int(n)] or [0], dtype=torch.long)
        dist.all_reduce(pairs)
        out.append(pairs.tolist()[:int(n)])
    return out


def counted_plan(plan, epoch_steps: list, cfg, rank: int):
    """The driver's estimate replaced by the counted steps (a RunPlan)."""
    t = cfg.train
    plan = plan.counted(epoch_steps, t.max_steps)
    if plan.total_steps == 0:
        raise ValueError(f"data.token_budget={cfg.data.token_budget}: not one optimizer step of "
                         f"{t.grad_accum_steps} micro-batches fits in an epoch on every rank; "
                         "lower train.total_batch_size or add data")
    if rank == 0:
        n = len(epoch_steps[0])
        print(f"[simpo-ray] token budget {cfg.data.token_budget}: {n} steps in epoch 0 "
              f"(about {sum(epoch_steps[0]) / max(n, 1):.1f} pairs per step), {plan.total_steps} steps in all",
              flush=True)
    return plan


def loss_scale(pairs: int, world: int, grad_accum: int, step_pairs: int) -> float:
    """Factor turning a micro-batch's mean loss into its share of the mean over the
    step's ``step_pairs`` pairs on all ranks. DeepSpeed divides by ``grad_accum`` and
    averages over ``world`` ranks, hence the two factors back."""
    return pairs * world * grad_accum / max(step_pairs, 1)


def micro_batches_per_epoch(epoch_steps, steps_per_epoch: int, t) -> list:
    """Micro-batches every rank runs in each epoch: the counted steps (token budget)
    or the plan's fixed steps, times the accumulation."""
    steps = [len(s) for s in epoch_steps] if epoch_steps else [steps_per_epoch] * t.epochs
    return [n * t.grad_accum_steps for n in steps]


def step_pairs(epoch_schedule: list, micro: int, grad_accum: int) -> int:
    """Global pairs of the step that micro-batch ``micro`` (1-based) belongs to. A
    dropped non-finite micro-batch shifts the window; the last step's count serves."""
    return epoch_schedule[min((micro - 1) // grad_accum, len(epoch_schedule) - 1)]
