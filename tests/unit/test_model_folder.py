import json
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
