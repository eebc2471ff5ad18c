"""simpo-ray scale, the parts that need no Ray: sizes, scaled configs and models, the
per-rung summary, growth flags, CSV and plot."""

import csv
import dataclasses
import os

import pytest

from simpo_ray.config import RunConfig, TinyModelConfig
from simpo_ray.scale import (CSV_FIELDS, PRESETS, build_scaled_model, flag_growth, parse_size, plot, scaled_dims,
                             size_config, summarize, write_csv)

from ..conftest import REPO


def test_sizes_parse():
    assert parse_size("256x4") == ("256x4", 256, 4)
    assert parse_size("XS") == ("xs", *PRESETS["xs"])
    for bad in ("256", "30x2", "64x0", "big"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert scaled_dims(256, 4) == {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}
    assert scaled_dims(4096, 32)["num_heads"] == 32 and scaled_dims(64, 2)["num_heads"] == 2


def test_size_config_scales_the_tiny_model_only():
    cfg = RunConfig.from_yaml(os.path.join(REPO, "examples", "tiny_cpu.yaml"))
    small = size_config(cfg, 64, 2)
    assert (small.model.tiny.hidden_size, small.model.tiny.num_layers, small.model.tiny.num_heads) == (64, 2, 2)
    assert small.train == cfg.train and small.model.tiny.seed == cfg.model.tiny.seed


def test_scaled_hf_model_keeps_the_architecture(tmp_path, tiny_path):
    """A local Hugging Face folder as the base: its config and tokenizer, new widths."""
    from transformers import AutoConfig, AutoTokenizer

    from simpo_ray.shapes import model_shape

    out = build_scaled_model(str(tiny_path), 96, 3, tmp_path)
    hf = AutoConfig.from_pretrained(out)
    base = AutoConfig.from_pretrained(tiny_path)
    assert (hf.model_type, hf.hidden_size, hf.num_hidden_layers, hf.vocab_size) == \
        (base.model_type, 96, 3, base.vocab_size)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny_path).get_vocab()
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        n = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    cfg = RunConfig.from_dict({"model": {"name_or_path": out}})
    assert model_shape(cfg).params() == n
    assert build_scaled_model(str(tiny_path), 96, 3, tmp_path) == out  # cached


def _prod(shape):
    p = 1
    for s in shape:
        p *= s
    return p


def _reports(seconds, tokens=1000, workers=2, rss_mb=1024):
    """Step reports as the workers write them (global tokens/s, pairs; the largest worker's memory)."""
    return [{"step": i + 1, "step_time_s": s, "tokens_per_s": tokens * workers / s, "pairs": 4 * workers,
             "sys/peak_rss_mb": rss_mb, "sys/model_rss_mb": rss_mb // 2, "sys/checkpoint_save_s": 0.1}
            for i, s in enumerate([9.0] + seconds)]


def test_summary_skips_the_warm_up_step_and_takes_the_median():
    from simpo_ray.shapes import tiny_shape

    cfg = RunConfig.from_yaml(os.path.join(REPO, "examples", "tiny_cpu.yaml"))
    shape = tiny_shape(dataclasses.asdict(TinyModelConfig()))
    assert cfg.train.num_workers == 2
    row = summarize("xs", scaled_dims(64, 2), shape, _reports([1.0, 3.0, 2.0]), cfg, peak_tflops=1.0,
                    checkpoint_bytes=2 * 2**20)
    assert row["steps_timed"] == 3 and row["step_time_s"] == 2.0
    assert row["tokens_per_s_per_worker"] == 500.0 and row["mean_seq_len"] == 125.0
    assert row["flops_per_token"] == int(shape.flops_per_token(125))
    assert row["mfu"] == pytest.approx(500 * shape.flops_per_token(125) / 1e12, rel=1e-3)
    assert row["checkpoint_gib"] == pytest.approx(2 / 1024, rel=1e-2)  # both ranks' shards
    assert row["model_rss_gib"] == 0.5


def _row(params, tps, mem):
    return {"size": str(params), "params": params, "tokens_per_s_per_worker": tps, "peak_gpu_gib": 0,
            "model_rss_gib": mem, "checkpoint_gib": params / 1e9}


def test_growth_faster_than_parameters_is_flagged(tmp_path):
    # time per token proportional to params (slope 1): fine; then 4x params cost 16x (slope 2)
    rows = flag_growth([_row(4e6, 1000, 0.4), _row(1e6, 4000, 0.1), _row(16e6, 62.5, 1.6)])
    assert [r["params"] for r in rows] == [1e6, 4e6, 16e6]
    assert rows[0]["flag"] == "" and rows[1]["time_slope"] == pytest.approx(1.0) and rows[1]["flag"] == ""
    assert rows[2]["time_slope"] == pytest.approx(2.0) and "time grows as params^2.00" in rows[2]["flag"]
    assert rows[2]["memory_slope"] == pytest.approx(1.0)
    write_csv(rows, tmp_path / "s.csv")
    with open(tmp_path / "s.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == CSV_FIELDS and len(got) == 3
    plot(rows, tmp_path / "s.png", "test")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
