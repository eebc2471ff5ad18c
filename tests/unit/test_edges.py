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
