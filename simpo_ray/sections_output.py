"""The ``output`` config section: the run folder, checkpoints kept, and the experiment
trackers (``output.trackers``: mlflow, tensorboard, wandb; ``simpo_ray.tracking``),
validated like the others (``simpo_ray.sections``); ``simpo_ray.config`` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from simpo_ray.sections import ConfigError, _choice, _positive

TRACKERS = ("mlflow", "tensorboard", "wandb")


@dataclass
class MlflowConfig:
    # None: a local file store, mlruns/ beside the run folder (e.g. output.root/mlruns);
    # http(s)://host:port for a tracking server. Credentials come from the environment
    # (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD), never from here.
    tracking_uri: Optional[str] = None
    # None: "simpo-ray" (a sweep: the sweep's name).
    experiment: Optional[str] = None
    # Log the exported weights as an artifact too (the model card always is).
    log_model: bool = False

    def validate(self, path: str) -> None:
        uri = self.tracking_uri
        if uri is not None and "@" in uri.split("://", 1)[-1].split("/", 1)[0]:
            raise ConfigError(f"{path}.tracking_uri", "has credentials in it; give them in MLFLOW_TRACKING_TOKEN "
                                                      "or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")


@dataclass
class TensorboardConfig:
    # None: the run folder (event files under <run folder>/tensorboard).
    dir: Optional[str] = None

    def validate(self, path: str) -> None:
        if self.dir is not None and not self.dir:
            raise ConfigError(f"{path}.dir", "must be a folder, or null")


@dataclass
class WandbConfig:
    # None: "simpo-ray". The API key comes from WANDB_API_KEY or `wandb login`.
    project: Optional[str] = None
    mode: str = "online"  # or "offline" (a local run folder; `wandb sync` uploads it)
    entity: Optional[str] = None

    def validate(self, path: str) -> None:
        _choice(f"{path}.mode", self.mode, ("online", "offline"))


@dataclass
class OutputConfig:
    # Run folder = root/name. Rerunning with the same name resumes from the latest checkpoint.
    root: str = "runs"
    name: str = "simpo"
    export: bool = True
    keep_checkpoints: int = 2
    # Where Ray Train persists checkpoints (storage/name/checkpoint_*): a path every node
    # sees, or a URI pyarrow.fs understands (s3://bucket/prefix, gs://..., file:///...).
    # None: root. Resume reads from here too.
    storage: Optional[str] = None
    # Experiment trackers the metrics also go to (metrics.jsonl is always written).
    trackers: list = field(default_factory=list)
    # false: a tracker that cannot be reached is a warning and the run trains on.
    trackers_required: bool = True
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, path: str) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"{path}.name", f"must be a non-empty folder name, got {self.name!r}")
        _positive(f"{path}.keep_checkpoints", self.keep_checkpoints)
        if "://" in self.root:
            raise ConfigError(f"{path}.root", f"must be a local or shared-mount path, got {self.root!r}; "
                                              "put object-store URIs in output.storage")
        if self.storage is not None and not self.storage:
            raise ConfigError(f"{path}.storage", "must be a path or URI, or null")
        for i, t in enumerate(self.trackers):
            _choice(f"{path}.trackers[{i}]", t, TRACKERS)
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"{path}.trackers", f"lists a tracker twice: {self.trackers}")
        self.mlflow.validate(f"{path}.mlflow")
        self.tensorboard.validate(f"{path}.tensorboard")
        self.wandb.validate(f"{path}.wandb")

    @property
    def run_dir(self) -> Path:
        return Path(self.root).expanduser().resolve() / self.name
