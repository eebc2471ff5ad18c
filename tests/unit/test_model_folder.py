"""A model folder is checked on the driver before any worker starts: missing pieces and
damaged or non-safetensors weights are named (file, size, what safetensors found)."""

import json
import random
import shutil

import pytest

from simpo_ray.models import check_model_folder


def test_complete_folder_passes(tiny_path):
    check_model_folder(str(tiny_path))
    check_model_folder("some-org/some-model")  # hub names are left to transformers


def test_missing_pieces_are_named(tiny_path, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_path, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="convert pickle weights to safetensors"):
        check_model_folder(str(d))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (d / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="1 of 2 shards missing .first: model-00002-of-00002"):
        check_model_folder(str(d))
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        check_model_folder(str(d))


def _sharded_copy(tiny_path, d):
    """The tiny model re-saved as two safetensors shards with an index, like a hub model."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_path, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(state)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, halves):
        save_file({k: state[k].contiguous() for k in part}, str(d / name), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, part in zip(names, halves) for k in part}}))
    return d, names


def test_model_folder_with_missing_or_damaged_shards(tiny_path, tmp_path):
    d, names = _sharded_copy(tiny_path, tmp_path / "m")
    check_model_folder(str(d))  # whole: passes
    second = d / names[1]
    data = second.read_bytes()
    second.write_bytes(data[: len(data) - 100])  # an interrupted copy
    # safetensors.safe_open (models.check_safetensors) names what it found wrong
    whole = rf"{names[1]} is not a whole safetensors file \({{}} bytes; truncated or corrupt\): "
    with pytest.raises(ValueError, match=whole.format(len(data) - 100) + "Error while deserializing header: "
                                         "incomplete metadata, file not fully covered"):
        check_model_folder(str(d))
    second.write_bytes(b"")
    with pytest.raises(ValueError, match=whole.format(0) + "Error while deserializing header: header too small"):
        check_model_folder(str(d))
    second.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 8)
    with pytest.raises(ValueError, match=whole.format(36) + "Error while deserializing header: invalid JSON in header"):
        check_model_folder(str(d))
    second.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of 2 shards missing \(first: {names[1]}\)"):
        check_model_folder(str(d))
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match="unreadable model.safetensors.index.json"):
        check_model_folder(str(d))


def test_single_file_model_that_is_not_safetensors(tiny_path, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_path, d)
    (d / "model.safetensors").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(1000)))
    with pytest.raises(ValueError, match=r"model.safetensors is not a whole safetensors file \(1000 bytes; "
                                         r"truncated or corrupt\): Error while deserializing header"):
        check_model_folder(str(d))
