"""`simpo-ray export` without a fit: which checkpoint it picks, what it refuses and why,
and what the model card says. The consolidation itself (DeepSpeed shards -> weights equal
to the end-of-run export, loaded by transformers and vLLM) runs on a real fit in
tests/integration/test_real_tokenizer.py."""

import hashlib
import json

import pytest

from simpo_ray.cli import main
from simpo_ray.config import RunConfig
from simpo_ray.export import ExportError, card_metrics, find_checkpoint, model_card


def fake_checkpoint(run_dir, name, world=2, payload=b"weights"):
    """A checkpoint folder with the manifest layout checkpoint.save writes (one file per rank)."""
    ckpt = run_dir / name
    (ckpt / "manifest").mkdir(parents=True)
    for r in range(world):
        f = ckpt / "deepspeed" / f"shard{r}.pt"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(payload + bytes([r]))
        entry = {f"deepspeed/shard{r}.pt": {"size": f.stat().st_size,
                                            "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}}
        (ckpt / "manifest" / f"rank{r}.json").write_text(json.dumps(entry))
    return ckpt


def test_newest_whole_checkpoint_is_picked_and_damaged_ones_are_named(tmp_path):
    fake_checkpoint(tmp_path, "checkpoint_000010")
    fake_checkpoint(tmp_path, "checkpoint_000020")
    newest = fake_checkpoint(tmp_path, "checkpoint_000030")
    ckpt, skipped = find_checkpoint(tmp_path, None, 2)
    assert ckpt.name == "checkpoint_000030" and skipped == []

    # a same-size bit flip in rank 1's shard of the newest: an older one, and the reason
    shard = newest / "deepspeed" / "shard1.pt"
    shard.write_bytes(b"weightz" + bytes([1]))
    ckpt, skipped = find_checkpoint(tmp_path, None, 2)
    assert ckpt.name == "checkpoint_000020"
    assert skipped == [("checkpoint_000030", "deepspeed/shard1.pt: sha256 mismatch")]

    with pytest.raises(ExportError, match="checkpoint_000030 is damaged: deepspeed/shard1.pt: sha256 mismatch"):
        find_checkpoint(tmp_path, "checkpoint_000030", 2)
    assert find_checkpoint(tmp_path, "checkpoint_000010", 2)[0].name == "checkpoint_000010"
    with pytest.raises(ExportError, match="no checkpoint named checkpoint_000040"):
        find_checkpoint(tmp_path, "checkpoint_000040", 2)
    # a checkpoint written by 2 workers, read as if by 4: not whole
    with pytest.raises(ExportError, match="no whole checkpoint"):
        find_checkpoint(tmp_path, None, 4)


def test_export_command_says_why_it_cannot(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 1
    assert "is not a run folder (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text(RunConfig().to_yaml())
    assert main(["export", str(tmp_path)]) == 1
    assert "has no checkpoint_* folder" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("simpo: {beta: -1}\n")
    assert main(["export", str(tmp_path)]) == 2  # a config error: the field, no traceback
    assert "simpo.beta" in capsys.readouterr().err


def test_model_card_shows_the_resolved_objective_data_and_final_metrics():
    cfg = RunConfig.from_dict({"simpo": {"beta": 2.5, "gamma_beta_ratio": 0.5}})
    report = {"step": 40, "loss": 0.61, "rewards/accuracies": 0.75, "eval/loss": 0.7,
              "eval/rewards/accuracies": 0.625, "gamma": 1.25, "data/dropped_total": 3,
              "sys/rss_mb": 900.0, "rank_micro_batches": 8, "total_steps": 40, "epoch": 1}
    metrics = card_metrics(report)
    assert set(metrics) == {"step", "loss", "rewards/accuracies", "eval/loss", "eval/rewards/accuracies", "gamma"}
    card = model_card(cfg, {"fingerprint": "abc123", "train_pairs": 576, "eval_pairs": 64}, metrics, 40,
                      "end of training")
    assert "loss simpo, beta 2.5, gamma 1.25 (gamma/beta 0.5)" in card
    assert "abc123 (576 train pairs, 64 eval pairs)" in card and "steps: 40 (end of training)" in card
    final = json.loads(card.split("## Final metrics")[1].split("```json")[1].split("```")[0])
    assert final["eval/rewards/accuracies"] == 0.625 and final["loss"] == 0.61
    for lib in ("simpo-ray", "torch", "transformers", "deepspeed", "ray"):
        assert f"{lib} " in card.split("- libraries:")[1].split("\n")[0]
    assert "None" not in card.split("## Final metrics")[0]

    # gamma given directly: the ratio is derived; a loss without a margin shows none
    direct = RunConfig.from_dict({"simpo": {"beta": 2.0, "gamma": 1.0, "gamma_beta_ratio": None}})
    assert "gamma 1 (gamma/beta 0.5)" in model_card(direct, {}, {}, 0, "x")
    dpo = RunConfig.from_dict({"simpo": {"loss": "dpo", "beta": 0.1}})
    assert "loss dpo, beta 0.1\n" in model_card(dpo, {}, {}, 0, "x")
