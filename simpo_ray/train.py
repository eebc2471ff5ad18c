"""The driver: Ray up -> data prepared once -> ``fit`` (the only TorchTrainer) -> summary.

``prepare(cfg)`` reads, checks and tokenizes the data once and plans the steps;
``fit(cfg, prepared, callbacks)`` runs one training run on it. ``train``, ``sft``,
sweep trials, ``scale``, on-policy rounds and the benchmarks all go through ``fit``.

Run folder (``output.root/output.name``): ``config.yaml`` (resolved), ``plan.json``, ``metrics.jsonl``
(one line per report), Ray's ``checkpoint_*`` folders, ``model/`` (the export) and
``summary.json``. Rerunning with the same name resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from simpo_ray import budget
from simpo_ray.config import RunConfig
from simpo_ray.export import CHANGES_FILE, PLAN_FILE
from simpo_ray.runplan import STOP_FILE, RunPlan


REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


def init_ray(cfg: RunConfig, extra_cpus: float = 0) -> None:
    """Join ``ray.address`` / $RAY_ADDRESS, else start a private local cluster.
    ``extra_cpus``: CPUs that other actors (kept generators) hold while workers train."""
    import ray
    import ray.data

    # Progress bars from every Ray Data operator drown the training log; our own
    # progress line per report is the signal.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return
    if _joined(cfg):
        ray.init(address=_joined(cfg))
        return
    t = cfg.train
    # Ray Data only gets CPUs that Train does not hold: declare a few more logical CPUs
    # than the workers reserve, or the data stream starves (a silent hang).
    num_cpus = cfg.ray.num_cpus or (max(os.cpu_count() or 1, math.ceil(t.num_workers * t.cpus_per_worker) + 2)
                                    + math.ceil(extra_cpus))
    # A private cluster listens on loopback only: without this switch Ray rewrites
    # 127.0.0.1 to the machine's interface address. The dashboard serves the state
    # API that Ray Train's placement-group cleaner and Tune over Train rely on.
    # The switch is read when ray is imported: set it for the processes ray.init
    # starts, and for this process, which may have imported ray already.
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # The state API finds the dashboard by scanning the machine for clusters and fails
    # when several run (parallel tests): every process of this one inherits its address.
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # Ray Train's controller collects reports when it polls the workers, every 2 s by
    # default, and a worker's report waits for that: with a report per step, a fast
    # step took 2 s. Its processes read this from the environment they inherit (on a
    # cluster: cluster/runtime_env.yaml).
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=port, _node_ip_address="127.0.0.1")
    # The private cluster ends with this process, even after a SIGKILL (simpo_ray.reaper).
    from simpo_ray import reaper

    reaper.start(os.path.basename(ctx.address_info["session_dir"].rstrip("/")))


def _joined(cfg: RunConfig) -> Optional[str]:
    """The address of the cluster a run joins; None: start a private local one."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Prepared:
    """The data read, checked and tokenized once (Ray datasets), and the plan made for
    ``cfg``. Sweeps, scale ladders and benchmarks fit several configs on one Prepared."""

    cfg: RunConfig
    datasets: dict
    plan: RunPlan
    stats: dict
    model_path: str
    model_config: dict = dataclasses.field(default_factory=dict)

    def plan_for(self, cfg: RunConfig, run_dir: str) -> RunPlan:
        """The plan for ``cfg`` on this data: the prepared one when nothing it depends on
        changed (steps, batches), else planned again. The data was tokenized with the
        prepared model's tokenizer, so its pad id holds for every config fit on it."""
        if (cfg.train, cfg.data) == (self.cfg.train, self.cfg.data):
            return dataclasses.replace(self.plan, run_dir=run_dir)
        return dataclasses.replace(budget.make_plan(cfg, self.stats, self.plan.pad_id, self.plan.has_eval, run_dir,
                                             self.model_config),
                                   probe_prompts=self.plan.probe_prompts, stop_ids=self.plan.stop_ids)


def batch_layout(cfg: RunConfig, plan: RunPlan) -> str:
    """The batch layout in words, for the plan line."""
    if not cfg.data.packing:
        return "padded rows (data.packing: false)"
    if cfg.model.attn_implementation == "flash_attention_2" and not plan.segment_attention:
        return "packed, one flash-attn varlen row"
    if not plan.segment_attention:
        return f"packed rows of <= {cfg.data.pack_row_tokens} tokens, block-diagonal attention mask"
    return ("packed, one row per micro-batch" + (", each pair's prompt once" if plan.share_prompt else "")
            + ", attention per sequence")


def with_probes(plan: RunPlan, cfg: RunConfig, eval_ds, stop_ids: list) -> RunPlan:
    """The plan with the generation probes' prompts (held-out, ``simpo_ray.probes``) and
    the ids generation stops at; none when probes are off or nothing is held out."""
    if cfg.eval.generate_every == 0 or eval_ds is None:
        return plan
    from simpo_ray.probes import pick_prompts

    return dataclasses.replace(plan, probe_prompts=pick_prompts(eval_ds, cfg.eval.generate_prompts),
                               stop_ids=list(stop_ids))


def progress_callback(run_dir: str, total_steps: int):
    """A Ray Train callback (runs in the controller): one printed line and one JSON
    line per report, and a check that every rank has run the same micro-batches."""
    from ray.train.v2.api.callback import UserCallback

    from simpo_ray.metrics import format_progress, last_attempt

    path = Path(run_dir) / "metrics.jsonl"

    class Progress(UserCallback):
        # Every invocation and every worker-group restart is a new attempt: the steps it
        # redoes after the last checkpoint supersede the earlier lines (metrics.read_reports).
        attempt, restarted = last_attempt(path) + 1, False

        def after_exception(self, run_context, worker_exceptions):
            self.restarted = True  # the next report comes from the restarted workers

        def after_report(self, run_context, metrics, checkpoint):
            if self.restarted:
                self.attempt, self.restarted = self.attempt + 1, False
            m = dict(metrics[0])
            m["ranks_micro_batches"] = [r.get("rank_micro_batches") for r in metrics]
            m.pop("rank_micro_batches", None)
            m["attempt"], m["time"] = self.attempt, time.time()
            total = m.get("total_steps", total_steps)
            if checkpoint is not None:
                m["checkpoint"] = checkpoint.path
            with open(path, "a") as f:
                f.write(json.dumps(m) + "\n")
            print("[simpo-ray] " + format_progress(m, total), flush=True)

    return Progress()


def with_reference(prepared: Prepared, cfg: RunConfig) -> Prepared:
    """``prepared`` with reference log-prob columns (one pass of the starting model over
    the data) when ``cfg``'s loss needs them and they are not there yet; else as is."""
    from simpo_ray.objective import LOSSES

    if not LOSSES[cfg.simpo.loss].needs_reference or "ref_chosen_logps" in prepared.datasets["train"].columns():
        return prepared
    from simpo_ray.reference import add_reference_logps

    print(f"[simpo-ray] loss '{cfg.simpo.loss}' needs reference log-probs: one pass over the data")
    datasets = {k: add_reference_logps(v, cfg, prepared.model_path, prepared.plan.pad_id, prepared.plan.layout)
                for k, v in prepared.datasets.items()}
    return dataclasses.replace(prepared, datasets=datasets)


def prepare(cfg: RunConfig, reference: bool = True) -> Prepared:
    """Ray up, data read/validated/tokenized once (plus, with ``reference``, reference
    log-probs for the losses that need them: ``with_reference``), the plan computed."""
    import ray

    from simpo_ray.data import prepare_datasets
    from simpo_ray.models import check_model_folder, read_model_config, resolve_model_path, tokenizer_facts

    init_ray(cfg)
    model_path = resolve_model_path(cfg.model.name_or_path, dataclasses.asdict(cfg.model.tiny))
    check_model_folder(model_path)
    # The tokenizer's facts in a task beside the data pipeline: the driver never imports
    # transformers (seconds of every start-up).
    facts = ray.remote(num_cpus=0)(tokenizer_facts).remote(
        model_path, cfg.model.trust_remote_code, cfg.data.add_bos, cfg.data.allow_special_tokens_in_text)
    data = prepare_datasets(cfg, model_path)
    stats, facts = data["stats"], ray.get(facts)
    model_config = read_model_config(model_path)
    plan = budget.make_plan(cfg, stats, facts["pad_id"], has_eval=data["eval"] is not None, model_config=model_config)
    plan = with_probes(plan, cfg, data["eval"], facts["stop_ids"])
    datasets = {"train": data["train"]}
    if data["eval"] is not None:
        datasets["eval"] = data["eval"]
    print(f"[simpo-ray] data: {stats['train_pairs']} train pairs, {stats['eval_pairs']} eval pairs, "
          f"dropped {stats['dropped'] or 'none'}, fingerprint {stats['fingerprint']}")
    print(f"[simpo-ray] batches: {batch_layout(cfg, plan)}")
    if plan.token_budget:
        print(f"[simpo-ray] plan: {cfg.train.num_workers} workers x micro-batches of <= {plan.token_budget} "
              f"tokens x accumulation {cfg.train.grad_accum_steps}; about {plan.steps_per_epoch} steps/epoch "
              f"(mean pair {stats.get('mean_pair_tokens', 0):.0f} tokens; the workers count the exact steps)")
    else:
        print(f"[simpo-ray] plan: {cfg.train.num_workers} workers x micro {cfg.train.micro_batch_size} x "
              f"accumulation {cfg.train.grad_accum_steps} = batch {cfg.train.total_batch_size}; "
              f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps")
    prepared = Prepared(cfg=cfg, datasets=datasets, plan=plan, stats=stats, model_path=model_path,
                        model_config=model_config)
    return with_reference(prepared, cfg) if reference else prepared


# Fields a resumed run may change: where the run is and how often it logs, evaluates,
# checkpoints or retries, and on how many workers (positions are global and a checkpoint
# of another worker count is converted), not what its checkpoints' trajectory means.
# max_steps is not among them (it changes the schedule), nor is the batch layout.
RUN_FREE = ("output.root", "output.name", "output.storage", "output.export", "output.keep_checkpoints", "ray",
            "generate", "train.stop_after", "train.log_every", "train.eval_every", "train.checkpoint_every",
            "train.max_failures", "train.max_bad_steps", "train.cpus_per_worker", "train.num_workers",
            "train.stop_on_alarm", "eval", "model.gradient_checkpointing", "model.logps_chunk_size",
            "output.trackers", "output.trackers_required", "output.mlflow", "output.tensorboard", "output.wandb")
RUN_RECORD = "run_config.json"  # the config the run's checkpoints were made with


def check_run_identity(cfg: RunConfig, run_dir: Path, allow: bool = False) -> list:
    """A run with checkpoints resumes only under the config it was made with (up to
    ``RUN_FREE``): otherwise a ConfigError with the differences, before any worker.
    ``allow`` (``--allow-config-change``): resume anyway; the differences are appended
    to ``config_changes.jsonl`` (the model card lists them) and returned."""
    from simpo_ray.config import check_rerun
    from simpo_ray.metrics import read_all

    record = run_dir / RUN_RECORD
    if not any(m.get("checkpoint") for m in read_all(run_dir / "metrics.jsonl")):
        record.unlink(missing_ok=True)  # nothing to resume: this config starts the run
    changes = check_rerun(record, cfg.to_dict(), "a training run", RUN_FREE, allow=allow, hint=(
        "rerun unchanged to resume, add --allow-config-change to resume under the new settings "
        "(recorded in the run folder and the model card), or choose another output.name"))
    if changes:
        with open(run_dir / CHANGES_FILE, "a") as f:
            f.write(json.dumps({"time": time.time(), "changes": changes}) + "\n")
        print("[simpo-ray] WARNING: resuming under a changed config (--allow-config-change): "
              + "; ".join(changes), flush=True)
    return changes


def fit(cfg: RunConfig, prepared: Prepared, callbacks=(), *, name: Optional[str] = None,
        storage: Optional[str] = None, allow_config_change: bool = False, tracking=None):
    """One training run (or its resume) of ``cfg`` on prepared data: the only place a
    ``TorchTrainer`` is built. N DeepSpeed workers over gloo (CPU) or NCCL (GPU).

    Ray Train's run is ``storage/name`` (default: ``output.storage`` or the run folder's
    parent, and ``output.name``), so rerunning the same name resumes from its latest
    checkpoint. The run folder (config, metrics.jsonl, summary) is ``storage/name`` when
    ``storage`` is given (a local path, as sweeps give it), else ``output.run_dir``.
    ``callbacks``: Ray Train callbacks besides the progress line (e.g. Tune's). A rerun
    that would resume under another config is refused (``check_run_identity``).
    ``tracking``: a ``tracking.RunInfo`` (group, params, tags) for ``output.trackers``,
    which are opened here, before any worker, and follow metrics.jsonl while it trains.
    Returns (ray Result, summary dict)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from simpo_ray.data import ingest_config
    from simpo_ray.pgroup import on_loopback, torch_config
    from simpo_ray.tracking import RunInfo, open_trackers
    from simpo_ray.worker import train_loop_per_worker

    run_dir = Path(storage) / name if storage and name else cfg.output.run_dir
    name, storage = name or cfg.output.name, storage or cfg.output.storage or str(cfg.output.run_dir.parent)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_identity(cfg, run_dir, allow_config_change)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request belongs to one invocation
    plan = prepared.plan_for(cfg, str(run_dir))
    (run_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=1, default=str))  # for `simpo-ray export`
    started, t = time.time(), cfg.train
    # Test hooks and caches (SIMPO_RAY_*) reach the workers as the driver has them.
    env = {k: v for k, v in os.environ.items() if k.startswith("SIMPO_RAY_")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg.to_dict(), "plan": plan.to_dict(), "env": env},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        torch_config=torch_config("nccl" if t.use_gpu else "gloo", loopback=on_loopback()),
        datasets=prepared.datasets,
        dataset_config=ingest_config(),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.output.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=[progress_callback(str(run_dir), plan.total_steps), *callbacks]),
    )
    trackers = open_trackers(cfg, run_dir, tracking or RunInfo(name), prepared.stats)
    try:
        with graceful_stop(run_dir / STOP_FILE):
            if trackers:
                trackers.follow(run_dir / "metrics.jsonl")
            result = trainer.fit()
    except BaseException:
        if trackers:
            trackers.finish(None, None, finished=False)
        raise
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    final = result.metrics or {}
    total_steps = final.get("total_steps", plan.total_steps)  # exact from the workers
    if trackers:
        done, card = final.get("step", 0) >= total_steps, Path(plan.export_dir) / "README.md"
        trackers.finish(str(card) if done and cfg.output.export and card.is_file() else None, plan.export_dir, done)
    summary = {
        "finished": final.get("step", 0) >= total_steps,
        "run_dir": str(run_dir), "total_steps": total_steps,
        "final_metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export_dir": plan.export_dir if cfg.output.export else None,
        "data": prepared.stats, "wall_s": round(time.time() - started, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return result, summary


@contextlib.contextmanager
def graceful_stop(stop_file: Path):
    """First SIGTERM / Ctrl-C: ask the workers to checkpoint and stop (they poll the
    stop file every step). A second Ctrl-C interrupts at once."""
    def ask(signum, frame):
        if stop_file.exists() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_file.write_text(str(signum))
        print(f"[simpo-ray] {signal.Signals(signum).name}: checkpointing and stopping at the next step "
              "(Ctrl-C again to abort)", flush=True)

    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled on the main thread
        return
    old = {sig: signal.signal(sig, ask) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def train(cfg: RunConfig, allow_config_change: bool = False, tracking=None):
    """Run (or resume) one training run (``tracking``: as ``fit`` takes it). Returns
    (ray Result, summary dict)."""
    cfg.validate()
    started = time.time()
    if cfg.output.run_dir.is_dir():  # refuse a changed config before the data is read
        check_run_identity(cfg, cfg.output.run_dir, allow_config_change)
    prepared = prepare(cfg)
    print(f"[simpo-ray] run folder {cfg.output.run_dir}")
    result, summary = fit(cfg, prepared, allow_config_change=allow_config_change, tracking=tracking)
    summary["wall_s"] = round(time.time() - started, 1)
    (cfg.output.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return result, summary
