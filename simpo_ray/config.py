"""Typed run configuration: ``RunConfig`` (the sections of ``simpo_ray.sections``), the
one YAML loader, the dotted-override setter, the rerun check, and the builder that turns
a mapping into any config dataclass, validated at build time.

A config crosses Ray boundaries as a plain dict: ``cfg.to_dict()`` on the driver,
``RunConfig.from_dict(d)`` on the worker. Every error names the dotted field path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

# The sections RunConfig holds; TinyModelConfig and RewardConfig (held by those) and
# ConfigError are re-exported so ``from simpo_ray.config import X`` works for all of them.
from simpo_ray.sections import (ConfigError, DataConfig, DeepSpeedConfig, EvalConfig, ModelConfig, OptimConfig,
                                RayConfig, SimPOConfig, TinyModelConfig, TrainConfig)
from simpo_ray.sections_generate import GenerateConfig, RewardConfig
from simpo_ray.sections_output import OutputConfig

__all__ = ["OBJECTIVE", "ConfigError", "RunConfig", "TinyModelConfig", "ModelConfig", "DataConfig", "SimPOConfig",
           "OptimConfig", "TrainConfig", "EvalConfig", "DeepSpeedConfig", "OutputConfig", "RayConfig", "RewardConfig",
           "GenerateConfig", "load_yaml", "parse_override", "set_dotted", "merged", "apply_overrides", "check_rerun",
           "build"]

# The tuning objective: held-out pairwise accuracy. The worker reports it under this
# key and the tuner optimises it, so both import this one constant.
OBJECTIVE = "eval/rewards/accuracies"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    simpo: SimPOConfig = field(default_factory=SimPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def validate(self) -> "RunConfig":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return build(cls, data or {}, "").validate()

    @classmethod
    def from_yaml(cls, path: Union[str, Path], overrides: Optional[list] = None) -> "RunConfig":
        return cls.from_dict(apply_overrides(load_yaml(path), overrides or []))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_yaml(path: Union[str, Path], what: str = "config") -> dict:
    """The one YAML reader of every command: a mapping, or a ConfigError naming the
    file and what is wrong with it (missing, a folder, binary, not YAML, not a mapping)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("<file>", f"{what} file not found: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:  # a binary file, a folder
        raise ConfigError("<file>", f"{path} is not a YAML text file ({type(e).__name__}: {e})") from None
    except yaml.YAMLError as e:
        raise ConfigError("<file>", f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("<file>", f"{path} must hold a mapping at the top level")
    _check_expanded_size(data, path)
    return data


MAX_CONFIG_NODES = 100_000


def _check_expanded_size(data, path) -> None:
    """YAML aliases share one object; copying the config expands them. An alias bomb
    (a few keys nested a few levels, each a reference to the one before) would expand
    to billions of nodes and hang the run: count the expanded nodes, stop at a cap."""
    seen, todo = 0, [data]
    while todo:
        node = todo.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise ConfigError("<file>", f"{path} expands to more than {MAX_CONFIG_NODES} values "
                                        "(YAML aliases nested in aliases?); write the values out")
        if isinstance(node, dict):
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)


def parse_override(item: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (``key.sub``, the value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(item, "override must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(key.strip(), f"value {raw!r} is not valid YAML: {e}") from None
    return key.strip(), value


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """A copy of ``data`` with the dotted ``key`` set to ``value`` (sections made as needed)."""
    return merged(data, {key: value})


def merged(data: dict, values: dict) -> dict:
    """A copy of a config dict with dotted keys set to (already parsed) values: one deep
    copy, then every key set in place."""
    out = copy.deepcopy(data)
    for key, value in values.items():
        node, parts = out, key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(key, f"'{p}' is not a section")
            node = nxt
        node[parts[-1]] = copy.deepcopy(value)
    return out


def apply_overrides(data: dict, overrides: list) -> dict:
    """Apply ``key.sub=value`` strings; values are parsed as YAML scalars/lists."""
    return merged(data, dict(parse_override(item) for item in overrides))


def check_rerun(path: Union[str, Path], now: dict, what: str, free: tuple = (), *, allow: bool = False,
                hint: str = "rerun unchanged to resume, or choose another name or output folder") -> list:
    """The one rerun check: ``path`` (JSON) records the settings a folder's results were
    made with. A rerun with other settings is refused with a ConfigError naming the
    dotted fields that differ, with their old and new values; fields in ``free``
    (dotted prefixes) may change. ``allow``: accept the change instead, update the
    record and return the differences ("field: old -> new"). The first run writes
    the record. Returns [] when nothing changed."""
    import json

    path = Path(path)
    now = _without(json.loads(json.dumps(now, default=str)), free)
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError("<rerun>", f"{path} is unreadable ({e}); remove it to start over") from None
        before = _without(before, free)
        if before == now:
            return []
        keys = sorted(_diff(before, now))
        diff = [f"{k}: {_get(before, k)!r} -> {_get(now, k)!r}" for k in keys]
        if not allow:
            raise ConfigError(keys[0] if keys else "<rerun>",
                              f"{path.parent} holds {what} made with other settings ({'; '.join(diff)}); {hint}")
    else:
        diff = []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=1, sort_keys=True))
    return diff


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _without(d: dict, free: tuple, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = _join(prefix, k)
        if key in free:
            continue
        out[k] = _without(v, free, key) if isinstance(v, dict) else v
    return out


def _diff(a: dict, b: dict, prefix: str = "") -> list:
    out = []
    for k in set(a) | set(b):
        key, x, y = _join(prefix, k), a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, key)
        elif x != y:
            out.append(key)
    return out


def build(cls, data: Any, path: str = ""):
    """A config dataclass from a mapping: unknown keys and wrong types are refused naming
    the dotted field (with a "did you mean" for near misses)."""
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(names)}"
        raise ConfigError(_join(path, k), f"unknown key{hint}")
    kwargs = {k: _coerce(hints[k], v, _join(path, k)) for k, v in data.items()}
    for k, v in kwargs.items():  # every seed of every section, checked in one place
        if k == "seed" and isinstance(v, int) and not 0 <= v < 2**32:
            raise ConfigError(_join(path, k), f"must be in [0, 2**32) (numpy and Ray Data seeds), got {v}")
    return cls(**kwargs)


def _coerce(tp, value, path):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1] if errors else ConfigError(path, "must not be null")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(path, f"must be finite, got {value!r}")
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                v = float(value)
            except ValueError:
                raise ConfigError(path, f"expected a number, got {value!r}") from None
            if not math.isfinite(v):
                raise ConfigError(path, f"must be finite, got {value!r}")
            return v
        raise ConfigError(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {value!r}")
    if tp in (list, dict):
        if isinstance(value, tp):
            return value
        raise ConfigError(path, f"expected a {tp.__name__}, got {value!r}")
    return value


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)
