"""Config and data edges of issue 15 (finding 4), each refused with a clear message or
kept to the one row it concerns. Each of these failed before its fix: a run folder
outside output.root, a negative seed that died inside Ray Data, a real file named like
a glob not found, a CSV byte-order mark renaming the first column, one bad JSON line
ending the whole file, and `data inspect` passing an empty file that `train` refuses."""

import json

import pytest

from simpo_ray.cli import main
from simpo_ray.config import ConfigError, RunConfig
from simpo_ray.sources import RowError, expand_files, iter_file_rows

GOOD = {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}


@pytest.mark.parametrize("key,value,words", [
    ("output.name", "..", "non-empty folder name"),
    ("output.name", ".", "non-empty folder name"),
    ("data.seed", -1, "[0, 2**32)"),
    ("train.seed", 2**32, "[0, 2**32)"),
    ("model.tiny.seed", -5, "[0, 2**32)"),
])
def test_config_values_that_would_escape_or_crash_later(key, value, words):
    section, *rest = key.split(".")
    data: dict = {}
    node = data.setdefault(section, {})
    for k in rest[:-1]:
        node = node.setdefault(k, {})
    node[rest[-1]] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        RunConfig.from_dict(data)
    assert words in str(e.value)


def test_the_cli_exits_2_on_them(capsys):
    assert main(["train", "examples/tiny_cpu.yaml", "output.name=..", "--dry-run"]) == 2
    assert "output.name" in capsys.readouterr().err


def test_a_real_file_named_like_a_glob_is_that_file(tmp_path):
    f = tmp_path / "prefs[1].jsonl"
    f.write_text(json.dumps(GOOD) + "\n")
    assert expand_files(str(f)) == [str(f)]
    # and a glob still globs
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    assert expand_files(str(tmp_path / "[a].jsonl")) == [str(tmp_path / "a.jsonl")]


def test_a_csv_with_a_byte_order_mark_keeps_its_first_column(tmp_path):
    f = tmp_path / "excel.csv"
    f.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\r\nhi,a,b\r\n")
    assert list(iter_file_rows(str(f))) == [(2, {"prompt": "hi", "chosen": "a", "rejected": "b"})]


def test_a_json_line_python_cannot_hold_drops_that_row_only(tmp_path):
    f = tmp_path / "big.jsonl"
    lines = [json.dumps(GOOD),
             '{"prompt": "p", "chosen": "a", "rejected": "b", "n": ' + "9" * 5000 + "}",
             '{"prompt": "p", "chosen": "a", "rejected": "b", "deep": ' + "[" * 5000 + "]" * 5000 + "}",
             json.dumps(GOOD)]
    f.write_text("\n".join(lines) + "\n")
    rows = list(iter_file_rows(str(f)))
    assert [n for n, _ in rows] == [1, 2, 3, 4]
    assert rows[0][1] == GOOD and rows[3][1] == GOOD
    for _, r in rows[1:3]:
        assert isinstance(r, RowError) and r.reason == "invalid JSON"
    assert "4300 digits" in str(rows[1][1]) and "RecursionError" in str(rows[2][1])


def test_data_inspect_fails_on_data_training_refuses(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = ["data", "inspect", "examples/tiny_cpu.yaml", f"data.train_files={empty}", "data.strict=false",
            f"output.root={tmp_path}"]
    assert main(args) == 1
    assert "no training pairs" in capsys.readouterr().err


# ---------------------------------------------------------------- pair hygiene (finding 5)
def test_canonical_text_ignores_what_a_reader_cannot_see():
    from simpo_ray.rows import canonical, pair_key

    assert canonical("Same\u00a0answer") == canonical("same  answer\u200b") == canonical(" SAME\tanswer\n")
    assert canonical("same answer") != canonical("same answers")
    turns = [{"role": "user", "content": "Q?"}]
    assert pair_key(turns, "A", "B") == pair_key([{"role": "user", "content": "q?\u200b"}], "a", "b ")
    assert pair_key(turns, "A", "B") != pair_key(turns, "B", "A")  # swapping is another pair
    assert pair_key(turns, "A", "B") != pair_key([{"role": "system", "content": "Q?"}], "A", "B")


def test_ties_and_duplicates_are_dropped_and_counted_unless_switched_off(tmp_path):
    from simpo_ray import rows as R
    from simpo_ray.inspect_data import inspect

    f = tmp_path / "pairs.jsonl"
    other = dict(GOOD, prompt="What is 3 + 3?", chosen="6.")
    lines = [GOOD, dict(GOOD, chosen="Same\u00a0answer", rejected="same answer\u200b"), other,
             dict(GOOD, prompt="what is  2 + 2?"), other]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    base = {"train_files": str(f), "eval_fraction": 0.0, "strict": True}
    rep = inspect(RunConfig.from_dict({"data": base}))
    assert rep["dropped"] == {R.TIE: 1, R.DUPLICATE: 2} and rep["pairs"] == 2 and rep["malformed"] == 0
    assert any("row 4: duplicate of" in o and "row 1" in o for o in rep["first_offenders"])
    rep = inspect(RunConfig.from_dict({"data": dict(base, dedup=False, drop_ties=False)}))
    assert rep["dropped"] == {} and rep["pairs"] == 5

    # the same file listed twice is read once (and said so)
    assert expand_files([str(f), str(tmp_path / "*.jsonl")]) == [str(f)]


# ---------------------------------------------------------------- bookkeeping (finding 6)
def test_the_latest_attempt_of_each_step_is_the_one_read(tmp_path):
    from simpo_ray.metrics import last_attempt, read_all, read_reports

    f = tmp_path / "metrics.jsonl"
    assert last_attempt(f) == 0
    lines = [{"step": 0, "attempt": 1, "loss": None}, {"step": 2, "attempt": 1, "loss": 0.9},
             {"step": 4, "attempt": 1, "loss": 0.8}, {"step": 4, "attempt": 2, "loss": 0.7},
             {"step": 6, "attempt": 2, "loss": 0.6}, {"step": 2, "attempt": 1, "loss": 5.0}]
    f.write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    got = read_reports(f)
    assert [(m["step"], m["loss"]) for m in got] == [(0, None), (2, 5.0), (4, 0.7), (6, 0.6)]
    assert last_attempt(f) == 2 and len(read_all(f)) == 6


# ---------------------------------------------------------------- config identity on resume (finding 2)
def _started_run(tmp_path, **over):
    """A run folder as a run with one checkpoint leaves it (record + a checkpoint line)."""
    from simpo_ray.train import check_run_identity

    cfg = RunConfig.from_yaml("examples/tiny_cpu.yaml", [f"output.root={tmp_path}"])
    run_dir = cfg.output.run_dir
    run_dir.mkdir(parents=True)
    assert check_run_identity(cfg, run_dir) == []
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "checkpoint": str(run_dir / "c")}) + "\n")
    return cfg, run_dir


def test_a_resume_under_a_changed_config_stops_with_the_differences(tmp_path, capsys):
    from simpo_ray.export import config_changes, model_card
    from simpo_ray.train import check_run_identity

    cfg, run_dir = _started_run(tmp_path)
    changed = RunConfig.from_yaml("examples/tiny_cpu.yaml", [f"output.root={tmp_path}", "train.total_batch_size=32",
                                                             "optim.lr=1e-2", "train.max_steps=80"])
    with pytest.raises(ConfigError) as e:
        check_run_identity(changed, run_dir)
    msg = str(e.value)
    for diff in ("train.total_batch_size: 16 -> 32", "optim.lr: 0.003 -> 0.01", "train.max_steps: None -> 80"):
        assert diff in msg
    assert "--allow-config-change" in msg
    # the command stops before any data is read or worker started: exit 2, the field
    args = ["train", "examples/tiny_cpu.yaml", f"output.root={tmp_path}", "train.total_batch_size=32"]
    assert main(args) == 2
    assert "train.total_batch_size: 16 -> 32" in capsys.readouterr().err

    # cadence, retries and resources may change freely
    free = RunConfig.from_yaml("examples/tiny_cpu.yaml", [f"output.root={tmp_path}", "train.log_every=1",
                                                          "train.eval_every=5", "train.stop_after=3",
                                                          "train.max_failures=5", "ray.num_cpus=8"])
    assert check_run_identity(free, run_dir) == []

    # allowed: recorded in the run folder, listed on the model card, and the new record
    changes = check_run_identity(changed, run_dir, allow=True)
    assert "optim.lr: 0.003 -> 0.01" in changes and config_changes(run_dir) == changes
    assert "resumed under a changed config: " in model_card(changed, {}, {}, 0, "x", config_changes(run_dir))
    assert check_run_identity(changed, run_dir) == []


def test_a_folder_without_checkpoints_starts_under_the_new_config(tmp_path):
    from simpo_ray.train import check_run_identity

    cfg, run_dir = _started_run(tmp_path)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")  # failed before its first checkpoint
    other = RunConfig.from_yaml("examples/tiny_cpu.yaml", [f"output.root={tmp_path}", "optim.lr=1e-2"])
    assert check_run_identity(other, run_dir) == []
