import json

import pytest

from simpo_ray import rows as R
from simpo_ray.data import summarize_errors
from simpo_ray.rows import normalize_row, split_of, tokenize_triplet
from simpo_ray.sources import DataError, RowError, expand_files, iter_file_rows
from tests.conftest import REPO


def test_plain_strings_shape():
    turns, c, r = normalize_row({"prompt": "2+2?", "chosen": "4.", "rejected": "5."})
    assert turns == [{"role": "user", "content": "2+2?"}] and (c, r) == ("4.", "5.")


def test_ultrafeedback_shape_uses_shared_prompt_turns():
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    row = {"prompt": "2+2?", "chosen": conv + [{"role": "assistant", "content": "4."}],
           "rejected": conv + [{"role": "assistant", "content": "5."}],
           "score_chosen": 9.0, "score_rejected": 2.0}
    turns, c, r = normalize_row(row)
    assert turns == conv and (c, r) == ("4.", "5.")


def test_chat_completions_with_explicit_prompt_list():
    row = {"prompt": [{"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "go away"}]}
    turns, c, r = normalize_row(row)
    assert turns == row["prompt"] and c == "hello"


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen == rejected"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "empty chosen"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty prompt"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "must be text"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     "prompt differs"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": ["img"]}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "is not text"),
])
def test_bad_rows_name_the_reason(row, reason):
    with pytest.raises(RowError, match=reason):
        normalize_row(row)


def test_tokenize_shares_prompt_single_bos_and_closes_with_eos(tokenizer):
    turns = [{"role": "user", "content": "What is 2+2?"}]
    t = tokenize_triplet(tokenizer, turns, "4.", "It is five, I think.", max_length=512, max_prompt_length=256)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert t["prompt_ids"][0] == bos and t["prompt_ids"].count(bos) == 1
    assert t["chosen_ids"][-1] == eos and t["rejected_ids"][-1] == eos
    assert bos not in t["chosen_ids"] and bos not in t["rejected_ids"]
    # prompt + completion is exactly the templated conversation
    full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": "4."}], tokenize=False)
    assert tokenizer.decode(t["prompt_ids"] + t["chosen_ids"]) == full
    assert not t["truncated"]


def test_truncation_keeps_prompt_end_and_never_empties_completions(tokenizer):
    turns = [{"role": "user", "content": "x" * 100 + " QUESTION?"}]
    t = tokenize_triplet(tokenizer, turns, "a" * 80, "b" * 80, max_length=40, max_prompt_length=30)
    assert len(t["prompt_ids"]) == 30 and t["truncated"]
    assert tokenizer.decode(t["prompt_ids"]).endswith("QUESTION?<|end|><|assistant|>\n")
    assert len(t["prompt_ids"]) + len(t["chosen_ids"]) <= 40 and t["chosen_ids"]


def test_pairs_identical_after_truncation_are_refused(tokenizer):
    turns = [{"role": "user", "content": "q"}]
    with pytest.raises(RowError, match="identical after truncation"):
        tokenize_triplet(tokenizer, turns, "same start A", "same start B", max_length=14, max_prompt_length=8)


def test_jsonl_rows_are_numbered_and_bad_lines_reported(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                  b'{"prompt": "a", "chosen": \n'
                  b'\n'
                  b'[1, 2]\n'
                  b'{"prompt": "\xff\xfe"}\n')
    rows = list(iter_file_rows(str(p)))
    assert [n for n, _ in rows] == [1, 2, 4, 5]
    assert isinstance(rows[0][1], dict)
    assert "invalid JSON" in str(rows[1][1])
    assert "not a JSON object" in str(rows[2][1])
    assert "invalid UTF-8" in str(rows[3][1])


def test_parquet_and_csv_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": ["c", "d"], "rejected": ["e", "f"]}),
                   tmp_path / "d.parquet")
    assert [n for n, _ in iter_file_rows(str(tmp_path / "d.parquet"))] == [1, 2]
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\na,b,c\n")
    assert list(iter_file_rows(str(tmp_path / "d.csv"))) == [(2, {"prompt": "a", "chosen": "b", "rejected": "c"})]


def test_expand_files_errors(tmp_path):
    with pytest.raises(DataError, match="no data files"):
        expand_files(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported"):
        expand_files(str(tmp_path / "x.txt"))


def test_split_is_seeded_and_by_prompt():
    turns = [[{"role": "user", "content": f"q{i}"}] for i in range(2000)]
    a = [split_of(t, 0, 0.1) for t in turns]
    assert a == [split_of(t, 0, 0.1) for t in turns]
    assert 0.07 < a.count("eval") / len(a) < 0.13
    assert a != [split_of(t, 1, 0.1) for t in turns]


def test_strict_mode_stops_naming_file_row_reason_and_lenient_counts():
    errs = [("a.jsonl", 7, "empty chosen"), ("a.jsonl", 3, "invalid JSON: x"), ("b.jsonl", 1, "empty chosen")]
    with pytest.raises(DataError) as e:
        summarize_errors(errs, strict=True)
    msg = str(e.value)
    assert "3 malformed row(s)" in msg and "a.jsonl: row 3: invalid JSON" in msg
    assert summarize_errors(errs, strict=False) == {"empty chosen": 2, "invalid JSON: x": 1}


def test_bundled_data_is_valid_and_has_signal():
    rows = [json.loads(l) for l in open(f"{REPO}/examples/data/preferences.jsonl")]
    assert len(rows) >= 300
    for r in rows:
        normalize_row(r)
    mean = lambda k: sum(len(r[k]) for r in rows) / len(rows)  # noqa: E731
    assert mean("rejected") > 2 * mean("chosen")  # padded rejections: a length skew to see


# ---------------------------------------------------------------- reasons, fixture, both modes
BROKEN = f"{REPO}/tests/fixtures/broken_rows.jsonl"
BROKEN_COUNTS = {R.INVALID_UTF8: 1, R.INVALID_JSON: 1, R.NOT_OBJECT: 1, R.MISSING: 2, R.WRONG_TYPE: 2,
                 R.EMPTY: 3, R.SAME: 1, R.PROMPT_DIFFERS: 1, R.NON_TEXT: 1, R.BAD_CONVERSATION: 2,
                 R.TRUNCATED_SAME: 1, R.TIE: 1, R.DUPLICATE: 1}
SHORT = {"max_length": 64, "max_prompt_length": 32}


def _cfg(tmp_path, **data):
    from simpo_ray.config import RunConfig

    d = {"train_files": BROKEN, "eval_fraction": 0.0, **SHORT, **data}
    return RunConfig.from_dict({"data": d, "output": {"root": str(tmp_path), "name": "run"}})


def test_broken_fixture_exercises_every_row_reason(tokenizer):
    from simpo_ray.inspect_data import inspect

    rep = inspect(_cfg("unused", strict=False), tokenizer=tokenizer)
    assert rep["dropped"] == BROKEN_COUNTS
    assert rep["rows"] == 22 and rep["pairs"] == 4
    # every reason a row can carry (tokenization needs a broken chat template: below)
    assert set(BROKEN_COUNTS) == set(R.REASONS) - {R.TOKENIZATION}


def test_tokenization_reason_from_a_template_that_is_not_prefix_stable():
    class Tok:  # renders the prompt differently once an answer follows
        chat_template = "x"

        def apply_chat_template(self, msgs, add_generation_prompt=False, tokenize=False):
            return "P>" if add_generation_prompt else "Q>" + msgs[-1]["content"]

    with pytest.raises(RowError) as e:
        tokenize_triplet(Tok(), [{"role": "user", "content": "q"}], "a", "b", 64, 32)
    assert e.value.reason == R.TOKENIZATION


def test_strict_summary_names_file_row_reason_and_skips_non_fatal():
    errs = [("f.jsonl", 18, "chosen and rejected identical after truncation", R.TRUNCATED_SAME)]
    assert summarize_errors(errs, strict=True) == {R.TRUNCATED_SAME: 1}  # counted, not fatal
    errs.append(("f.jsonl", 3, "invalid JSON: Expecting value at column 5", R.INVALID_JSON))
    with pytest.raises(DataError, match=r"f.jsonl: row 3: invalid JSON: Expecting value") as e:
        summarize_errors(errs, strict=True)
    assert "row 18" not in str(e.value) and "'invalid JSON': 1" in str(e.value)


def test_data_inspect_cli_exit_codes_and_histogram(tmp_path, tiny_path, capsys):
    import yaml

    from simpo_ray.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train_files": BROKEN, **SHORT},
                                   "output": {"root": str(tmp_path), "name": "run"}}))
    assert main(["data", "inspect", str(cfg)]) == 1  # strict: malformed rows
    out = capsys.readouterr().out
    assert "missing field: 2" in out and f"{BROKEN}: row 2: invalid UTF-8" in out
    assert "identical after truncation: 1" in out and "p50" in out and "truncated" in out
    png = tmp_path / "h.png"
    assert main(["data", "inspect", str(cfg), "data.strict=false", "--histogram", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "data_lengths.png").exists()  # the default place (first call)
    capsys.readouterr()
    assert main(["data", "inspect", str(cfg), "data.strict=false", "--json", "--histogram", str(png)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dropped"] == BROKEN_COUNTS and rep["pairs"] == 4
    assert set(rep["token_lengths"]) == {"prompt", "chosen", "rejected"} and rep["truncated_pairs"] == 0


# ---------------------------------------------------------------- shapes and sources
def test_column_map_reads_other_names_and_names_them_in_errors():
    m = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    turns, c, r = normalize_row({"question": "q?", "good": "yes", "bad": "no"}, m)
    assert turns[0]["content"] == "q?" and (c, r) == ("yes", "no")
    with pytest.raises(RowError, match="missing field 'bad'"):
        normalize_row({"question": "q?", "good": "yes"}, m)


def test_column_map_is_validated():
    from simpo_ray.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="data.column_map.answer"):
        RunConfig.from_dict({"data": {"column_map": {"answer": "x"}}})
    with pytest.raises(ConfigError, match="data.eval_stratify"):
        RunConfig.from_dict({"data": {"eval_stratify": True, "eval_fraction": 0.0}})


def test_save_to_disk_folders(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    datasets.Dataset.from_list(rows).select([4, 0, 1]).save_to_disk(str(tmp_path / "one"))
    assert expand_files(str(tmp_path / "one")) == [str(tmp_path / "one")]
    assert [(n, r["prompt"]) for n, r in iter_file_rows(str(tmp_path / "one"))] == [(1, "q4"), (2, "q0"), (3, "q1")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict.*dd/train"):
        expand_files(str(tmp_path / "dd"))
    assert expand_files(str(tmp_path / "dd" / "train")) == [str(tmp_path / "dd" / "train")]
    # a plain folder holding a saved dataset and a JSONL file: both, never the dataset's own json files
    (tmp_path / "mix").mkdir()
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "mix" / "saved"))
    (tmp_path / "mix" / "z.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert expand_files(str(tmp_path / "mix")) == [str(tmp_path / "mix" / "saved"), str(tmp_path / "mix" / "z.jsonl")]
    # saved with a numpy format: rows still come back as plain Python values
    datasets.Dataset.from_list(rows).with_format("numpy").save_to_disk(str(tmp_path / "np"))
    assert next(iter_file_rows(str(tmp_path / "np"))) == (1, rows[0])
    # a DatasetDict root read directly, and a damaged Arrow shard: errors that name the folder
    with pytest.raises(DataError, match=r"DatasetDict.*dd/train"):
        list(iter_file_rows(str(tmp_path / "dd")))
    shard = next((tmp_path / "one").glob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"{tmp_path / 'one'}: cannot be read \(ArrowInvalid"):
        list(iter_file_rows(str(tmp_path / "one")))


def test_hub_names_parse_and_read_through_datasets_without_network(monkeypatch):
    import datasets

    from simpo_ray.sources import parse_hub

    assert expand_files("HuggingFaceH4/ultrafeedback_binarized@train_prefs") == \
        ["hf://HuggingFaceH4/ultrafeedback_binarized@train_prefs"]
    assert expand_files(["hf://org/name"]) == ["hf://org/name"]
    assert parse_hub("hf://org/name") == ("org/name", "train")
    calls, row = [], {"prompt": "p", "chosen": "a", "rejected": "b"}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or [row])
    assert list(iter_file_rows("hf://org/name@test_prefs")) == [(1, row)]
    assert calls == [("org/name", "test_prefs")]

    def offline(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="hf://org/name: could not load"):
        list(iter_file_rows("hf://org/name"))


def test_fingerprint_tracks_bytes_settings_and_folders(tmp_path):
    from simpo_ray.sources import fingerprint

    f = tmp_path / "a.jsonl"
    f.write_text("x\n")
    a = fingerprint([str(f)], {"max_length": 8})
    assert a == fingerprint([str(f)], {"max_length": 8}) != fingerprint([str(f)], {"max_length": 9})
    f.write_text("y\n")
    assert fingerprint([str(f)], {"max_length": 8}) != a
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part").write_text("1")
    b = fingerprint([str(tmp_path / "d")], {})
    (tmp_path / "d" / "part").write_text("2")
    assert fingerprint([str(tmp_path / "d")], {}) != b


# ---------------------------------------------------------------- stratified split
def test_stratified_split_takes_the_same_share_from_every_length_quartile():
    import random

    rng = random.Random(0)
    groups, lengths = [], []
    for g in range(800):
        n = int(rng.lognormvariate(5, 1))  # long-tailed response lengths
        for _ in range(rng.choice([1, 1, 2])):  # some prompts have two pairs
            groups.append(f"g{g}")
            lengths.append(n + rng.randint(0, 3))
    ev = R.stratified_eval_groups(groups, lengths, 0.1, seed=0)
    assert ev == R.stratified_eval_groups(groups, lengths, 0.1, seed=0)
    assert ev != R.stratified_eval_groups(groups, lengths, 0.1, seed=1)
    per = {}
    for g, n in zip(groups, lengths):
        per.setdefault(g, []).append(n)
    keys = sorted(per)
    quart = R.length_quartiles([sum(per[k]) / len(per[k]) for k in keys])
    for q in range(4):
        members = [k for k, qq in zip(keys, quart) if qq == q]
        assert abs(sum(k in ev for k in members) - 0.1 * len(members)) <= 0.5


def test_json_array_files(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}, [1]], indent=1))
    rows = list(iter_file_rows(str(p)))
    assert rows[0] == (1, {"prompt": "a", "chosen": "b", "rejected": "c"})
    assert rows[1][0] == 2 and rows[1][1].reason == "not a JSON object"
