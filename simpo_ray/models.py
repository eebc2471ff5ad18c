"""Model folders: where a model comes from, whether its folder is whole, its dtype.

Heavy imports live inside the functions: importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path

DTYPES = ("float32", "bfloat16")


def torch_dtype(name: str):
    """The config's dtype string -> the torch dtype (the one mapping every loader uses)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def resolve_model_path(name_or_path: str, tiny_spec: dict) -> str:
    """``tiny`` -> the built-in model folder, built on this node from its seed (so no
    shared file system is needed); anything else is returned as given."""
    if name_or_path == "tiny":
        from simpo_ray.tiny import materialize

        return str(materialize(tiny_spec))
    return name_or_path


def check_model_folder(path: str) -> None:
    """Fail on the driver, before any worker starts, when a local model folder is
    incomplete: no config, no weights, shards named by the index but missing, or a
    weights file that safetensors cannot open or that holds fewer bytes than its
    header promises (a truncated copy). Only safetensors weights are accepted (no
    pickle is ever loaded)."""
    import json

    root = Path(path)
    if not root.is_dir():
        return  # a hub name: transformers resolves (and checks) it
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"model folder {root}: config.json is missing")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"model folder {root}: unreadable {index.name}: {e}") from None
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise FileNotFoundError(f"model folder {root}: {len(missing)} of {len(shards)} shards missing "
                                    f"(first: {missing[0]})")
    elif not (root / "model.safetensors").is_file():
        pickles = sorted(p.name for p in root.glob("*.bin"))
        hint = f" (found {pickles[0]}: convert pickle weights to safetensors first)" if pickles else ""
        raise FileNotFoundError(f"model folder {root}: no model.safetensors or sharded index{hint}")
    else:
        shards = ["model.safetensors"]
    for s in shards:
        check_safetensors(root / s)


def check_safetensors(path: Path) -> None:
    """``safe_open`` validates the header and that the data it describes is in the
    file: a cut, empty or junk file fails there. No tensor is loaded."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:  # header check only; no torch import
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"model folder {path.parent}: {path.name} is not a whole safetensors file "
                         f"({path.stat().st_size} bytes; truncated or corrupt): {e}") from None


def tokenizer_facts(path: str, trust_remote_code: bool, add_bos, allow_special_tokens_in_text: bool) -> dict:
    """What the driver needs from the tokenizer: the pad id collate pads with (the eos
    id when there is no pad token) and the ids generation stops at under the data's
    token policy. Loading a tokenizer imports transformers (seconds): ``train.prepare``
    runs this as a Ray task while the data is read, so the driver never imports it."""
    from transformers import AutoTokenizer

    from simpo_ray.tokens import streams_for

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {"pad_id": int(pad), "stop_ids": [int(t) for t in streams_for(tok, add_bos, allow_special_tokens_in_text).stop_ids()]}


def read_model_config(path: str) -> dict:
    """A local model folder's config.json as a dict ({} for a hub name or no file);
    no transformers import."""
    import json

    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except ValueError:
        return {}  # check_model_folder and the loaders report a broken config
