"""What crosses the Ray boundary besides the config: frozen, typed, ``to_dict``/``from_dict``.

``RunPlan``: facts every worker needs that the driver computes once (steps, the pad id,
the data's statistics, the run folder). ``TrainState``: the position a checkpoint
restores (step, epoch, micro-batch) and the little the loop keeps across reports.
Both are pure data; nothing here imports torch or Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# Written by the driver on SIGTERM / Ctrl-C; workers then checkpoint and stop.
STOP_FILE = "STOP"


class _Boundary:
    """to_dict / from_dict for a frozen dataclass of plain values."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class RunPlan(_Boundary):
    steps_per_epoch: int
    total_steps: int
    has_eval: bool
    pad_id: int
    run_dir: str
    # Data statistics (counts, fingerprint, drops per reason), without the file list.
    stats: dict = field(default_factory=dict)
    # Training pairs per epoch that no optimizer step uses (drop_last, the step grid).
    unused_pairs_per_epoch: int = 0
    # Generation probes (simpo_ray.probes): held-out prompts [{"id", "prompt_ids"}] and
    # the token ids generation stops at.
    probe_prompts: list = field(default_factory=list)
    stop_ids: list = field(default_factory=list)
    # Packed batches (collate.packed_layout): the prompt once per pair, attention per
    # segment (the model switched to simpo_ray.attention).
    share_prompt: bool = False
    segment_attention: bool = False
    # Tokens per micro-batch (data.token_budget, "auto" resolved); None: fixed pair counts.
    token_budget: Optional[int] = None

    @property
    def layout(self) -> dict:
        """``collate.packed_model_inputs``'s layout keywords."""
        return {"share_prompt": self.share_prompt, "segment_attention": self.segment_attention}

    @property
    def export_dir(self) -> str:
        return str(Path(self.run_dir) / "model")

    @property
    def stop_file(self) -> str:
        return str(Path(self.run_dir) / STOP_FILE)

    @property
    def data_metrics(self) -> dict:
        """Constant per run, logged with every report so drops are never silent."""
        dropped = self.stats.get("dropped") or {}
        return {"data/dropped_total": sum(dropped.values()),
                "data/unused_pairs_per_epoch": self.unused_pairs_per_epoch,
                **{f"data/dropped/{k}": v for k, v in dropped.items()},
                **{f"data/token_notes/{k}": v for k, v in (self.stats.get("token_notes") or {}).items()}}

    def counted(self, epoch_steps: list, max_steps: Optional[int]) -> "RunPlan":
        """The driver's step estimate replaced by the workers' count (token budget):
        ``epoch_steps`` holds the global pairs of every step, per epoch."""
        total = sum(len(s) for s in epoch_steps)
        if max_steps:
            total = min(total, max_steps)
        return dataclasses.replace(
            self, total_steps=total, steps_per_epoch=len(epoch_steps[0]),
            unused_pairs_per_epoch=self.stats.get("train_pairs", 0) - sum(epoch_steps[0]))


@dataclass(frozen=True)
class TrainState(_Boundary):
    """Where training stands; saved in every checkpoint (DeepSpeed client state)."""

    step: int = 0
    epoch: int = 0
    micro: int = 0                  # global micro-batches of ``epoch`` already consumed (all ranks)
    world_size: int = 0             # the number of workers that saved it (set by checkpoint.save)
    skipped_micro_batches: int = 0  # non-finite losses dropped before backward
    # The collapse alarm's reference: the first average chosen log-prob per key.
    chosen_logp_start: dict = field(default_factory=dict)
    alarm_printed: bool = False
    # The generation alarm's reference: the step-0 probe's gen/ metrics.
    gen_start: dict = field(default_factory=dict)
    gen_alarm_printed: bool = False
    # The latest value of every model metric reported (train and eval/): the model card's
    # final metrics, for the end-of-run export and for any checkpoint exported later.
    metrics: dict = field(default_factory=dict)
    # Fallbacks past damaged checkpoints so far. The steps redone after one are saved
    # under new names (``checkpoint_name``): Ray's registry still lists the damaged
    # folders, and evicting such an entry deletes its path, a fresh folder of that name.
    lineage: int = 0

    @property
    def checkpoint_name(self) -> str:
        return f"checkpoint_{self.step:06d}" + (f".{self.lineage}" if self.lineage else "")

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)
