"""train_loop_per_worker: the SimPO loop that every Ray Train worker runs.

The loop reads top to bottom; each piece it calls is a named helper below it.
Every rank runs the same number of micro-batches, forwards and reports (ZeRO-3
forwards and ``ray.train.report`` are collectives: a rank that skips one hangs the rest).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time

from simpo_ray import budget, checkpoint, metrics, probes
from simpo_ray.config import RunConfig
from simpo_ray.export import card_metrics, config_changes, model_card
from simpo_ray.objective import LOSSES
from simpo_ray.runplan import RunPlan, TrainState


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from simpo_ray.engine import build_engine

    cfg, plan, rank = start_worker(config)
    t = cfg.train
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if plan.has_eval else None
    epoch_steps = budget.schedule(train_shard, cfg, t.num_workers, plan) if plan.token_budget else None
    if epoch_steps:
        plan = budget.counted_plan(plan, epoch_steps, cfg, rank)
    engine, restored = checkpoint.restore(lambda universal: build_engine(cfg, model_path(cfg), plan.total_steps,
                                                                         universal=universal,
                                                                         segments=plan.segment_attention)[0])
    state = TrainState.from_dict(restored) if restored else TrainState()
    if rank == 0 and state.step:
        print(f"[simpo-ray] resumed at step {state.step} (epoch {state.epoch}, micro-batch {state.micro})")
    if state.step == 0 and eval_shard is not None:  # the baseline the curve starts from
        report, state = build_report(engine, cfg, plan, state, None, eval_shard, probe=probes.due(cfg, 0, False, True))
        ray.train.report(report)
    window, reported, stop = Window(state.step), state.step, False
    for position, rank_micro, epoch in optimizer_steps(engine, train_shard, cfg, plan, epoch_steps, state, window):
        state = state.replace(**position)
        stop = should_stop(plan, t, state.step)
        last = state.step >= plan.total_steps
        if not (last or stop or any(state.step % k == 0 for k in (t.log_every, t.eval_every, t.checkpoint_every))):
            continue
        due_eval = eval_shard is not None and (state.step % t.eval_every == 0 or last)
        report, state = build_report(engine, cfg, plan, state, window, eval_shard if due_eval else None,
                                     epoch=epoch, rank_micro=rank_micro, probe=probes.due(cfg, state.step, last, due_eval))
        stop = stop or alarm_stop(report, t, rank)
        save = state.step % t.checkpoint_every == 0 or last or stop
        report_and_checkpoint(engine, report, state if save else None)
        window.reset(state.step)
        reported = state.step
        if last or stop:
            break
    if state.step > reported:  # dropped micro-batches ended the data before the last planned step
        state = state.replace(epoch=t.epochs, micro=0)
        report, state = build_report(engine, cfg, plan, state, window, None, epoch=t.epochs - 1)
        report_and_checkpoint(engine, report, state)
    if stop and state.step < plan.total_steps:
        if rank == 0:
            print(f"[simpo-ray] stopped at step {state.step} with a checkpoint; rerun the same command to continue")
        return
    if cfg.output.export:
        card = model_card(cfg, plan.stats, state.metrics, state.step, "end of training", config_changes(plan.run_dir))
        path = checkpoint.export(engine, model_path(cfg), plan.export_dir, card)
        if rank == 0:
            print(f"[simpo-ray] exported Hugging Face model to {path}")


def start_worker(config: dict):
    """The config and plan from the driver, the driver's SIMPO_RAY_* environment, quiet
    logs, threads, the seed and a pid file. Returns (cfg, plan, rank)."""
    import ray.train
    import torch

    from simpo_ray.engine import configure_threads

    global _RSS_START_MB
    _RSS_START_MB = metrics.rss_mb()  # before the model: sys/model_rss_mb is what loading and training added
    os.environ.update(config.get("env") or {})
    cfg, plan = RunConfig.from_dict(config["run"]), RunPlan.from_dict(config["plan"])
    quiet_worker_logs()
    configure_threads(cfg.train.cpus_per_worker)
    torch.manual_seed(cfg.train.seed)
    rank = ray.train.get_context().get_world_rank()
    write_pid_file(plan.run_dir, rank)
    return cfg, plan, rank


_RSS_START_MB = 0.0


def model_path(cfg: RunConfig) -> str:
    from simpo_ray.models import resolve_model_path

    return resolve_model_path(cfg.model.name_or_path, dataclasses.asdict(cfg.model.tiny))


class Window:
    """What the steps since the last report add up: metric sums, tokens, wall time."""

    def __init__(self, step: int = 0):
        self.reset(step)

    def reset(self, step: int) -> None:
        """Start a new window after a report (in place: the step loop holds this object)."""
        self.sums, self.tokens, self.started, self.first_step = {}, 0, time.perf_counter(), step

    def add(self, pair_sums: dict, tokens: int) -> None:
        metrics.add_sums(self.sums, pair_sums)
        self.tokens += tokens


def optimizer_steps(engine, shard, cfg: RunConfig, plan: RunPlan, epoch_steps, state: TrainState, window: Window):
    """Run this rank's micro-batches from ``state``'s position; after every optimizer
    step yield (the new position: step, epoch, micro = global micro-batches of the epoch
    consumed, skipped_micro_batches; micro-batches this rank has run in all; the epoch
    it ran in). Non-finite losses are dropped on every rank before backward (parameters
    and the accumulation window untouched; the next round takes the place);
    ``train.max_bad_steps`` in a row stop the run."""
    import torch.distributed as dist

    t = cfg.train
    epoch_micro = budget.micro_batches_per_epoch(epoch_steps, plan.steps_per_epoch, t)
    world, rank = dist.get_world_size(), dist.get_rank()
    faults, bad, skipped, step = injected_faults(), 0, state.skipped_micro_batches, state.step
    if step >= plan.total_steps:  # a rerun of a finished run: nothing to train
        return
    for epoch in range(state.epoch, t.epochs):
        start = state.micro if epoch == state.epoch else 0
        stream = budget.iter_micro(shard, cfg, epoch, plan)
        for n, (g, batch) in enumerate(budget.rank_micro(stream, start, rank, world), 1):
            consumed = start + n * world  # global micro-batches of the epoch after this round
            if consumed > epoch_micro[epoch]:
                break
            rnd = -(-g // world)  # the round on a run that never changed its worker count
            loss, pair_sums, n_tokens = forward_batch(engine, batch, cfg, plan.pad_id, plan.layout)
            if epoch_steps:  # a mean over the step's pairs on all ranks, not over this micro-batch's
                loss = loss * budget.loss_scale(len(batch["prompt_ids"]), world, t.grad_accum_steps,
                                                budget.step_pairs(epoch_steps[epoch], g, t.grad_accum_steps * world))
            if not metrics.agree(bool(loss.isfinite().item()) and f"{epoch}:{rnd}" not in faults):
                skipped += 1
                bad = check_bad_streak(bad + 1, t.max_bad_steps, engine.global_steps, epoch, rnd, batch)
                continue
            engine.backward(loss)
            engine.step()
            window.add(pair_sums, n_tokens)
            if engine.global_steps == step:  # still accumulating gradients
                continue
            step = engine.global_steps
            grad_ok = math.isfinite(float(engine.get_global_grad_norm() or 0.0))  # DeepSpeed skipped it if not
            bad = 0 if grad_ok else check_bad_streak(bad + 1, t.max_bad_steps, step, epoch, rnd, batch)
            end = consumed + world > epoch_micro[epoch]
            yield ({"step": step, "epoch": epoch + end, "micro": 0 if end else consumed,
                    "skipped_micro_batches": skipped}, (sum(epoch_micro[:epoch]) + consumed) // world, epoch)
            if step >= plan.total_steps:
                return


def injected_faults() -> set:
    """Fault injection for tests: SIMPO_RAY_INJECT_NAN="epoch:micro,..." poisons those
    micro-batches' losses: micro-batch ``micro`` (1-based) of every rank, i.e. the global
    round ``micro`` (the driver forwards SIMPO_RAY_* variables to the workers)."""
    return {x for x in os.environ.get("SIMPO_RAY_INJECT_NAN", "").split(",") if x}


def should_stop(plan: RunPlan, t, step: int) -> bool:
    """Stop early with a checkpoint: ``train.stop_after`` reached, or the driver asked
    (it writes the stop file on SIGTERM / Ctrl-C). Rank 0 looks; everyone agrees."""
    import torch.distributed as dist

    asked = bool(t.stop_after and step >= t.stop_after)
    if dist.get_rank() == 0:
        asked = asked or os.path.exists(plan.stop_file)
    return not metrics.agree(not asked)


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


def forward_batch(engine, batch: dict, cfg: RunConfig, pad_id: int, layout: dict | None = None):
    """One forward of chosen+rejected -> (loss, metric sums, tokens computed). ``layout``:
    ``RunPlan.layout`` (packed rows: the shared prompt, attention per segment)."""
    import torch

    from simpo_ray.objective import step_loss

    b, extra = collate(batch, cfg, pad_id, layout)
    b = {k: v.to(engine.device) for k, v in b.items()}
    extra = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in extra.items()}
    sums, counts = engine(b["input_ids"], b.get("attention_mask"), b["labels"],
                          sequence_index=b.get("sequence_index"), **extra)
    ref = None
    if "ref_chosen_logps" in batch:  # precomputed once by the reference pass
        ref = torch.as_tensor(list(batch["ref_chosen_logps"]) + list(batch["ref_rejected_logps"]),
                              dtype=sums.dtype, device=sums.device)
    loss, pair_sums = step_loss(cfg.simpo, sums, counts, ref)
    real = b["attention_mask"] if "attention_mask" in b else b["sequence_index"] >= 0
    return loss, pair_sums, int(real.sum())


def collate(batch: dict, cfg: RunConfig, pad_id: int, layout: dict | None = None):
    """Numpy batch -> (tensors, extra model kwargs): padded, or packed (``data.packing``,
    laid out as ``layout`` says: ``RunPlan.layout``). A ``chosen``-rows loss (sft) trains
    the chosen rows only, trimmed to their longest."""
    from simpo_ray import collate as C

    chosen_only = LOSSES[cfg.simpo.loss].rows == "chosen"
    if cfg.data.packing and not chosen_only:
        return C.packed_model_inputs(batch, pad_id, cfg.data.pack_row_tokens,
                                     flash=cfg.model.attn_implementation == "flash_attention_2", **(layout or {}))
    b = C.collate_numpy_batch(batch, pad_id, pad_to_multiple_of=8)
    if chosen_only:
        n = len(batch["prompt_ids"])
        width = int(b["attention_mask"][:n].sum(1).max())
        b = {k: v[:n, : -(-width // 8) * 8] for k, v in b.items()}
    return b, {}


def evaluate(engine, shard, cfg: RunConfig, pad_id: int, layout: dict | None = None) -> dict:
    """Held-out pairs, no grad. Same keys as training under ``eval/``."""
    import torch

    sums = {}
    engine.eval()
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy"):
            metrics.add_sums(sums, forward_batch(engine, batch, cfg, pad_id, layout)[1])
    engine.train()
    return metrics.to_metrics(metrics.all_reduce_sums(sums), prefix="eval/")


def build_report(engine, cfg: RunConfig, plan: RunPlan, state: TrainState, window, eval_shard, *,
                 epoch: int | None = None, rank_micro: int | None = None, probe: bool = False):
    """The one place a report is made -> (report, state with the alarm's memory).

    ``window`` None: the step-0 baseline (held-out metrics only). Otherwise the global
    training metrics since the last report, held-out metrics when ``eval_shard`` is
    given, the generation probe's ``gen/`` metrics when ``probe``, the margin in effect,
    the data's constant counts and the step accounting, and the alarms.
    Collective (all-reduces): every rank calls it."""
    import torch.distributed as dist

    report = {"step": state.step, **plan.data_metrics}  # every line, the step-0 baseline too
    if window is not None:
        sums = dict(window.sums, tokens=float(window.tokens))
        total = metrics.all_reduce_sums(sums)
        grad_norm = engine.get_global_grad_norm()
        seconds = max(time.perf_counter() - window.started, 1e-9)
        report.update(metrics.to_metrics(total), epoch=epoch, lr=float(engine.get_lr()[0]),
                      grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                      # Every rank ran for about the same wall time, so global tokens / seconds.
                      tokens_per_s=total["tokens"] / seconds,
                      step_time_s=seconds / max(state.step - window.first_step, 1), **memory_metrics())
        report.update(total_steps=plan.total_steps,
                      skipped_micro_batches=state.skipped_micro_batches, skipped_steps=int(engine.skipped_steps))
        if rank_micro is not None:
            report["rank_micro_batches"] = rank_micro
    if eval_shard is not None:
        report.update(evaluate(engine, eval_shard, cfg, plan.pad_id, plan.layout))
    if probe and plan.probe_prompts:
        report.update(probes.probe(engine, cfg, plan, model_path(cfg), state.step))
    report.update(gamma=cfg.simpo.resolved_gamma, gamma_beta_ratio=cfg.simpo.resolved_gamma_beta_ratio)
    state = collapse_alarm(report, state, cfg.simpo.chosen_logp_alarm, dist.get_rank())
    state = probes.generation_alarm(report, state, cfg.eval, dist.get_rank())
    return report, state.replace(metrics={**state.metrics, **card_metrics(report)})


ALARMS = (metrics.COLLAPSE_ALARM, probes.GENERATION_ALARM)


def alarm_stop(report: dict, t, rank: int) -> bool:
    """``train.stop_on_alarm`` and an alarm is up in this report (the same on every rank)."""
    up = [k for k in ALARMS if report.get(k)]
    if t.stop_on_alarm and up and rank == 0:
        print(f"[simpo-ray] stopping at step {report['step']} on {', '.join(up)} (train.stop_on_alarm); "
              "a rerun resumes and stops again while the alarm holds: set train.stop_on_alarm=false to go on",
              flush=True)
    return bool(t.stop_on_alarm and up)


def memory_metrics() -> dict:
    """The largest worker's memory, MiB: resident now (``sys/rss_mb``, to see a leak),
    its peak, the peak above what the process held before the model, and on GPUs the
    allocator's peak. Collective."""
    import resource

    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"sys/rss_mb": metrics.max_over_ranks(metrics.rss_mb()), "sys/peak_rss_mb": metrics.max_over_ranks(peak),
           "sys/model_rss_mb": metrics.max_over_ranks(peak - _RSS_START_MB)}
    if torch.cuda.is_available():
        out["sys/gpu_peak_mb"] = metrics.max_over_ranks(torch.cuda.max_memory_allocated() / 2**20)
    return out


def collapse_alarm(report: dict, state: TrainState, threshold, rank: int = 0) -> TrainState:
    """Flag (and print once) when the average chosen log-prob per token has fallen more
    than ``threshold`` below its first value: likelihood collapse. Held-out numbers
    are preferred when present. The first value is kept in the checkpoint state."""
    key = "eval/logps/chosen" if "eval/logps/chosen" in report else "logps/chosen"
    if threshold is None or key not in report:
        return state
    starts = dict(state.chosen_logp_start)
    start = starts.setdefault(key, report[key])
    state = state.replace(chosen_logp_start=starts)
    drop = start - report[key]
    report["alarm/chosen_logp_drop"] = drop
    report[metrics.COLLAPSE_ALARM] = bool(drop > threshold)
    if drop > threshold and not state.alarm_printed:
        state = state.replace(alarm_printed=True)
        if rank == 0:
            print(f"[simpo-ray] WARNING: {key} fell {drop:.2f} nats/token from {start:.2f} to {report[key]:.2f} "
                  f"(simpo.chosen_logp_alarm={threshold}): likelihood collapse; consider a lower lr or "
                  "a larger gamma_beta_ratio / an sft_weight", flush=True)
    return state


def report_and_checkpoint(engine, report: dict, state: TrainState | None) -> None:
    """Every rank reports (a barrier); with ``state`` every rank also saves its shard."""
    import ray.train

    if state is None:
        ray.train.report(report)
        return
    started = time.perf_counter()
    ckpt, tmp = checkpoint.save(engine, state.to_dict())
    report = dict(report, **{"sys/checkpoint_save_s": time.perf_counter() - started})
    try:
        ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=state.checkpoint_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
