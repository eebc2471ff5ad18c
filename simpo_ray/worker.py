"""train_loop_per_worker: the SimPO loop that every Ray Train worker runs.

The loop reads top to bottom; each piece it calls is a named helper below it.
Every rank runs the same number of micro-batches, forwards and reports (ZeRO-3
forwards and ``ray.train.report`` are collectives: a rank that skips one hangs the rest).
"""

from __future__ import annotations

import math
import os
import shutil
import time

from simpo_ray import checkpoint, metrics
from simpo_ray.config import RunConfig


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch

    from simpo_ray.engine import build_engine, configure_threads
    from simpo_ray.models import resolve_model_path

    cfg, plan = RunConfig.from_dict(config["run"]), config["plan"]
    t = cfg.train
    quiet_worker_logs()
    configure_threads(t.cpus_per_worker)
    torch.manual_seed(t.seed)
    rank = ray.train.get_context().get_world_rank()
    write_pid_file(plan["run_dir"], rank)
    model_path = resolve_model_path(cfg.model.name_or_path, plan["tiny_spec"])
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if plan["has_eval"] else None
    schedule = None  # token budget: global pairs of every step, per epoch
    if cfg.data.token_budget:
        schedule = budget_schedule(train_shard, cfg)
        plan = budget_plan(plan, schedule, cfg, rank)
    engine, _ = build_engine(cfg, model_path, plan["total_steps"])
    state = checkpoint.restore(engine) or {"step": 0, "epoch": 0, "micro": 0, "skipped_micro_batches": 0}
    if rank == 0 and state["step"]:
        print(f"[simpo-ray] resumed at step {state['step']} (epoch {state['epoch']}, micro-batch {state['micro']})")
    world = ray.train.get_context().get_world_size()
    epoch_micro = micro_batches_per_epoch(schedule, plan, t)

    if state["step"] == 0 and eval_shard is not None:  # the baseline the curve starts from
        baseline = {"step": 0, **evaluate(engine, eval_shard, cfg, plan), **plan["margin"]}
        collapse_alarm(baseline, state, cfg.simpo.chosen_logp_alarm, rank)
        ray.train.report(baseline)
    step = reported = state["step"]
    sums, tokens, clock, bad_streak, stop = {}, 0, time.perf_counter(), 0, False
    for epoch in range(state["epoch"], t.epochs):
        skip = state["micro"] if epoch == state["epoch"] else 0
        micro_per_epoch = epoch_micro[epoch]
        for micro, batch in enumerate(iter_micro(train_shard, cfg, epoch), start=1):
            if micro > micro_per_epoch or step >= plan["total_steps"] or stop:
                break
            if micro <= skip:  # resume: these micro-batches were trained before the checkpoint
                continue
            loss, pair_sums, n_tokens = forward_batch(engine, batch, cfg, plan)
            if schedule:  # a mean over the step's pairs on all ranks, not over this micro-batch's
                loss = loss * budget_loss_scale(len(batch["prompt_ids"]), world, t.grad_accum_steps,
                                                step_pairs(schedule[epoch], micro, t.grad_accum_steps))
            if not agree(torch.isfinite(loss).item() and f"{epoch}:{micro}" not in plan["inject_nan"]):
                # Dropped on every rank before backward: parameters and the gradient
                # accumulation window are untouched; the next micro-batch takes its place.
                state["skipped_micro_batches"] += 1
                bad_streak = check_bad_streak(bad_streak + 1, t.max_bad_steps, step, epoch, micro, batch)
                continue
            engine.backward(loss)
            engine.step()
            metrics.add_sums(sums, pair_sums)
            tokens += n_tokens
            if engine.global_steps == step:  # still accumulating gradients
                continue
            step = engine.global_steps
            grad_ok = math.isfinite(float(engine.get_global_grad_norm() or 0.0))  # DeepSpeed skipped it if not
            bad_streak = 0 if grad_ok else check_bad_streak(bad_streak + 1, t.max_bad_steps, step, epoch, micro, batch)
            stop = should_stop(plan, t, step)
            last = step >= plan["total_steps"]
            if step % t.log_every and step % t.eval_every and step % t.checkpoint_every and not (last or stop):
                continue
            report = step_report(engine, sums, tokens, time.perf_counter() - clock, step, epoch)
            if eval_shard is not None and (step % t.eval_every == 0 or last):
                report.update(evaluate(engine, eval_shard, cfg, plan))
            report.update(plan["margin"], **plan["data_metrics"],
                          rank_micro_batches=micro + sum(epoch_micro[:epoch]),
                          total_steps=plan["total_steps"],
                          skipped_micro_batches=state["skipped_micro_batches"],
                          skipped_steps=int(engine.skipped_steps))
            collapse_alarm(report, state, cfg.simpo.chosen_logp_alarm, rank)
            state.update(step=step, epoch=epoch if micro < micro_per_epoch else epoch + 1,
                         micro=micro if micro < micro_per_epoch else 0)
            save_now = step % t.checkpoint_every == 0 or last or stop
            report_and_checkpoint(engine, report, dict(state) if save_now else None)
            reported, sums, tokens, clock = step, {}, 0, time.perf_counter()
    if step > reported:  # dropped micro-batches ended the data before the last planned step
        state.update(step=step, epoch=t.epochs, micro=0)
        report = step_report(engine, sums, tokens, time.perf_counter() - clock, step, t.epochs - 1)
        report_and_checkpoint(engine, dict(report, **plan["margin"]), dict(state))

    if stop and step < plan["total_steps"]:
        if rank == 0:
            print(f"[simpo-ray] stopped at step {step} with a checkpoint; rerun the same command to continue")
        return
    if cfg.output.export:
        card = checkpoint.model_card(cfg.to_dict(), plan["stats"], {"step": step})
        path = checkpoint.export(engine, model_path, plan["export_dir"], card)
        if rank == 0:
            print(f"[simpo-ray] exported Hugging Face model to {path}")


def agree(ok: bool) -> bool:
    """True only if ``ok`` on every rank (a collective)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag) == 0


def should_stop(plan: dict, t, step: int) -> bool:
    """Stop early with a checkpoint: ``train.stop_after`` reached, or the driver asked
    (it writes the stop file on SIGTERM / Ctrl-C). Rank 0 looks; everyone agrees."""
    import torch.distributed as dist

    asked = bool(t.stop_after and step >= t.stop_after)
    if dist.get_rank() == 0:
        asked = asked or os.path.exists(plan["stop_file"])
    return not agree(not asked)


def check_bad_streak(streak: int, limit: int, step: int, epoch: int, micro: int, batch: dict) -> int:
    """Count consecutive non-finite micro-batches / steps; stop the run at ``limit``."""
    if streak >= limit:
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in
                   zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])]
        rows = list(zip(batch["source"], batch["row"])) if "source" in batch else "n/a"
        raise FloatingPointError(
            f"{streak} consecutive non-finite losses or gradient norms (train.max_bad_steps={limit}) at "
            f"step {step}, epoch {epoch}, micro-batch {micro}; last batch rows {rows}, token lengths {lengths}. "
            "Lower optim.lr, check the data, or resume from the last checkpoint.")
    return streak


def write_pid_file(run_dir: str, rank: int) -> None:
    """run_dir/workers/rank{r}.pid: lets an operator (or a fault test) find a worker."""
    d = os.path.join(run_dir, "workers")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))


def quiet_worker_logs() -> None:
    """Our progress line carries the signal; drop per-report INFO dumps and
    deprecation chatter from libraries (warnings and errors still show)."""
    import logging
    import warnings

    from ray.train.v2._internal.execution import context as train_context

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)


def iter_micro(shard, cfg: RunConfig, epoch: int):
    """The micro-batches of one epoch: ``micro_batch_size`` pairs, or with
    ``data.token_budget`` as many whole pairs as fit the budget (same order)."""
    batches = iter_train(shard, cfg, epoch)
    if not cfg.data.token_budget:
        return batches
    from simpo_ray.collate import token_budget_batches

    return token_budget_batches(batches, cfg.data.token_budget)


def budget_schedule(shard, cfg: RunConfig) -> list:
    """Token-budget batching: the global number of pairs in every optimizer step of
    every epoch, as ``[[pairs of step 1, ...] per epoch]``.

    Budget micro-batches hold a data-dependent number of pairs, so ranks would run
    different numbers of forwards (a ZeRO-3 hang). Each rank counts its own stream
    once per epoch (the order is seeded, so the training pass sees the same batches);
    the ranks then agree to take the steps every rank can fill, and sum the pairs of
    each step so the loss can be a mean over all of them."""
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


def budget_plan(plan: dict, schedule: list, cfg: RunConfig, rank: int) -> dict:
    """The driver's estimate replaced by the counted steps."""
    t = cfg.train
    total = sum(len(s) for s in schedule)
    if t.max_steps:
        total = min(total, t.max_steps)
    if total == 0:
        raise ValueError(f"data.token_budget={cfg.data.token_budget}: not one optimizer step of "
                         f"{t.grad_accum_steps} micro-batches fits in an epoch on every rank; "
                         "lower train.total_batch_size or add data")
    used = sum(schedule[0])
    if rank == 0:
        print(f"[simpo-ray] token budget {cfg.data.token_budget}: {len(schedule[0])} steps in epoch 0 "
              f"(about {used / max(len(schedule[0]), 1):.1f} pairs per step), {total} steps in all", flush=True)
    data_metrics = dict(plan["data_metrics"], **{"data/unused_pairs_per_epoch": plan["stats"]["train_pairs"] - used})
    return dict(plan, total_steps=total, steps_per_epoch=len(schedule[0]), data_metrics=data_metrics)


def budget_loss_scale(pairs: int, world: int, grad_accum: int, step_pairs: int) -> float:
    """Factor turning a micro-batch's mean loss into its share of the mean over the
    step's ``step_pairs`` pairs on all ranks. DeepSpeed divides by ``grad_accum`` and
    averages over ``world`` ranks, hence the two factors back."""
    return pairs * world * grad_accum / max(step_pairs, 1)


def micro_batches_per_epoch(schedule, plan: dict, t) -> list:
    """Micro-batches every rank runs in each epoch: the counted steps (token budget)
    or the plan's fixed steps, times the accumulation."""
    steps = [len(s) for s in schedule] if schedule else [plan["steps_per_epoch"]] * t.epochs
    return [n * t.grad_accum_steps for n in steps]


def step_pairs(epoch_schedule: list, micro: int, grad_accum: int) -> int:
    """Global pairs of the step that micro-batch ``micro`` (1-based) belongs to. A
    dropped non-finite micro-batch shifts the window; the last step's count serves."""
    return epoch_schedule[min((micro - 1) // grad_accum, len(epoch_schedule) - 1)]


def iter_train(shard, cfg: RunConfig, epoch: int):
    """This rank's micro-batches for one epoch, in a seeded order a resume reproduces."""
    from simpo_ray.data import shuffle_args

    mb = cfg.train.micro_batch_size
    return shard.iter_batches(batch_size=mb, batch_format="numpy", drop_last=True,
                              **shuffle_args(cfg.data, epoch, mb))


def forward_batch(engine, batch: dict, cfg: RunConfig, plan: dict):
    """One forward of chosen+rejected -> (loss, metric sums, non-pad tokens)."""
    import torch

    from simpo_ray.objective import objective

    b, extra = collate(batch, cfg, plan)
    b = {k: v.to(engine.device) for k, v in b.items()}
    extra = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in extra.items()}
    sums, counts = engine(b["input_ids"], b.get("attention_mask"), b["labels"],
                          sequence_index=b.get("sequence_index"), **extra)
    ref = None
    if "ref_chosen_logps" in batch:  # precomputed once by the reference pass
        ref = torch.as_tensor(list(batch["ref_chosen_logps"]) + list(batch["ref_rejected_logps"]),
                              dtype=sums.dtype, device=sums.device)
    loss, pair_sums = objective(cfg.simpo, sums, counts, ref)
    real = b["attention_mask"] if "attention_mask" in b else b["sequence_index"] >= 0
    return loss, pair_sums, int(real.sum())


def collate(batch: dict, cfg: RunConfig, plan: dict):
    """Numpy batch -> (tensors, extra model kwargs): padded, or packed (``data.packing``)."""
    from simpo_ray import collate as C

    if cfg.data.packing and cfg.simpo.loss != "sft":
        return C.packed_model_inputs(batch, plan["pad_id"], cfg.data.pack_row_tokens,
                                     flash=cfg.model.attn_implementation == "flash_attention_2")
    b = C.collate_numpy_batch(batch, plan["pad_id"], pad_to_multiple_of=8)
    if cfg.simpo.loss == "sft":  # chosen rows only, trimmed to their own longest
        n = len(batch["prompt_ids"])
        width = int(b["attention_mask"][:n].sum(1).max())
        b = {k: v[:n, : -(-width // 8) * 8] for k, v in b.items()}
    return b, {}


def evaluate(engine, shard, cfg: RunConfig, plan: dict) -> dict:
    """Held-out pairs, no grad. Same keys as training under ``eval/``."""
    import torch

    sums = {}
    engine.eval()
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy"):
            metrics.add_sums(sums, forward_batch(engine, batch, cfg, plan)[1])
    engine.train()
    return metrics.to_metrics(metrics.all_reduce_sums(sums), prefix="eval/")


def collapse_alarm(report: dict, state: dict, threshold, rank: int = 0) -> None:
    """Flag (and print once) when the average chosen log-prob per token has fallen more
    than ``threshold`` below its first value: likelihood collapse. Held-out numbers
    are preferred when present. The first value is kept in the checkpoint state."""
    key = "eval/logps/chosen" if "eval/logps/chosen" in report else "logps/chosen"
    if threshold is None or key not in report:
        return
    start = state.setdefault("chosen_logp_start", {}).setdefault(key, report[key])
    drop = start - report[key]
    report["alarm/chosen_logp_drop"] = drop
    report["alarm/chosen_logp_collapse"] = bool(drop > threshold)
    if drop > threshold and not state.get("alarm_printed"):
        state["alarm_printed"] = True
        if rank:
            return
        print(f"[simpo-ray] WARNING: {key} fell {drop:.2f} nats/token from {start:.2f} to {report[key]:.2f} "
              f"(simpo.chosen_logp_alarm={threshold}): likelihood collapse; consider a lower lr or "
              "a larger gamma_beta_ratio / an sft_weight", flush=True)


def step_report(engine, sums: dict, tokens: int, seconds: float, step: int, epoch: int) -> dict:
    """Global training metrics since the last report (all-reduced over ranks)."""
    sums = dict(sums, tokens=float(tokens))
    total = metrics.all_reduce_sums(sums)
    out = metrics.to_metrics(total)
    grad_norm = engine.get_global_grad_norm()
    out.update({
        "step": step, "epoch": epoch, "lr": float(engine.get_lr()[0]),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        # Every rank ran for about the same wall time, so global tokens / seconds.
        "tokens_per_s": total["tokens"] / max(seconds, 1e-9),
        "sys/rss_mb": metrics.max_over_ranks(metrics.rss_mb()),  # the largest worker's, for leaks
    })
    return out


def report_and_checkpoint(engine, report: dict, state: dict | None) -> None:
    """Every rank reports (a barrier); with ``state`` every rank also saves its shard."""
    import ray.train

    if state is None:
        ray.train.report(report)
        return
    ckpt, tmp = checkpoint.save(engine, state)
    try:
        ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{state['step']:06d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
