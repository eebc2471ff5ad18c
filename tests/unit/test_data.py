import json

import pytest

from simpo_ray.data import (DataError, RowError, expand_files, iter_file_rows, normalize_row,
                            split_of, summarize_errors, tokenize_triplet)


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
    from tests.conftest import REPO

    rows = [json.loads(l) for l in open(f"{REPO}/examples/data/preferences.jsonl")]
    assert len(rows) >= 300
    for r in rows:
        normalize_row(r)
    mean = lambda k: sum(len(r[k]) for r in rows) / len(rows)  # noqa: E731
    assert mean("rejected") > 2 * mean("chosen")  # padded rejections: a length skew to see
