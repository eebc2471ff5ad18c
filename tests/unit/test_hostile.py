"""Hostile input, made in code: every case stops with a clear error (file, row or field,
reason) before any training, or in lenient mode (data.strict false) becomes a counted
drop; none crashes the pipeline or hangs.

Data goes through the code the trainer runs inside Ray Data (``read_files_batch`` ->
``Tokenize`` -> ``summarize_errors``, called here without Ray) and through ``simpo-ray
data inspect``; both must agree. Configs go through ``RunConfig.from_yaml`` and the
command line (model folders: tests/unit/test_model_folder.py).
``tests/integration/test_hostile_train.py`` drives ``simpo-ray train``.
"""

import dataclasses
import json
import random
import re

import pytest
import yaml

from simpo_ray import data as D
from simpo_ray import rows as R
from simpo_ray.config import ConfigError, RunConfig, TinyModelConfig
from simpo_ray.data import DataError

MAX_LENGTH, MAX_PROMPT = 64, 32
BIG = 200_000  # characters: thousands of times max_length

GOOD = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "It is 5, I think."}


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# (line bytes, reason or None for a good row); the file is these lines in order.
ROWS = [
    (_line(GOOD), None),
    (b'{"prompt": "p", "cho\n', R.INVALID_JSON),  # cut mid-string
    (_line({"prompt": "p", "chosen": 3, "rejected": "b"}), R.WRONG_TYPE),
    (_line({"prompt": {"text": "hi"}, "chosen": "a", "rejected": "b"}), R.WRONG_TYPE),
    (_line({"prompt": "p", "chosen": "a", "rejected": True}), R.WRONG_TYPE),
    (_line({"prompt": "p", "chosen": ["a", "b"], "rejected": "b"}), R.BAD_CONVERSATION),
    (_line(dict(GOOD, prompt_ids=["1"], chosen_ids=[5], rejected_ids=[6])), R.WRONG_TYPE),
    (_line(dict(GOOD, prompt_ids=[1, 2], chosen_ids=[10**9], rejected_ids=[6])), R.WRONG_TYPE),
    (_line(dict(GOOD, prompt_ids=[1, 2], chosen_ids=[True], rejected_ids=[6])), R.WRONG_TYPE),
    (_line({"prompt": "p", "chosen": "", "rejected": "b"}), R.EMPTY),
    (_line({"prompt": "p", "chosen": "a", "rejected": " \t\n "}), R.EMPTY),
    (_line({"prompt": "\u00a0\n", "chosen": "a", "rejected": "b"}), R.EMPTY),
    (_line({"prompt": [{"role": "user", "content": "  "}], "chosen": "a", "rejected": "b"}), R.EMPTY),
    (b"{}\n", R.MISSING),
    (b"null\n", R.NOT_OBJECT),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n', R.INVALID_UTF8),  # Latin-1
    (b'{"prompt": "\xc0\xaf", "chosen": "a", "rejected": "b"}\n', R.INVALID_UTF8),  # overlong
    (b'{"prompt": "p\\ud800", "chosen": "a", "rejected": "b"}\n', R.INVALID_UTF8),  # lone surrogate
    (b'{"prompt": "p\x00", "chosen": "a", "rejected": "b"}\n', R.INVALID_JSON),  # raw control byte
    (_line({"prompt": "Q" * BIG + "?", "chosen": "a" * BIG, "rejected": "b" * BIG}), None),  # enormous
    (_line({"prompt": "p", "chosen": "x" * BIG + "A", "rejected": "x" * BIG + "B"}), R.TRUNCATED_SAME),
    (_line(dict(GOOD, prompt="What is 3+3?")), None),
    (b'{"prompt": "p", "chosen": "a", "rej', R.INVALID_JSON),  # the file stops mid-row
]
EXPECTED = {}
for _, _reason in ROWS:
    if _reason:
        EXPECTED[_reason] = EXPECTED.get(_reason, 0) + 1
GOOD_ROWS = [n for n, (_, r) in enumerate(ROWS, start=1) if r is None]


def _parquet(path, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Small hostile files, made here (binary and invalid UTF-8 included)."""
    import datetime

    d = tmp_path_factory.mktemp("hostile")
    rng = random.Random(8)
    noise = bytes(rng.randrange(256) for _ in range(4096))
    f = {"rows": d / "rows.jsonl"}
    f["rows"].write_bytes(b"".join(line for line, _ in ROWS))
    f["noise_jsonl"] = d / "noise.jsonl"
    f["noise_jsonl"].write_bytes(noise)
    f["noise_parquet"] = d / "noise.parquet"
    f["noise_parquet"].write_bytes(noise)
    f["empty_parquet"] = d / "empty.parquet"
    f["empty_parquet"].write_bytes(b"")
    f["noise_json"] = d / "noise.json"
    f["noise_json"].write_bytes(b"[" + noise)
    f["cut_json"] = d / "cut.json"
    f["cut_json"].write_text(json.dumps([GOOD, GOOD])[:-10])
    f["latin1_csv"] = d / "latin1.csv"
    f["latin1_csv"].write_bytes(b"prompt,chosen,rejected\nq,a,b\ncaf\xe9,a,b\n")
    f["huge_csv"] = d / "huge.csv"
    f["huge_csv"].write_text(f"prompt,chosen,rejected\nq,{'a' * BIG},{'b' * BIG}\n")
    n = 3
    f["pq_names"] = _parquet(d / "names.parquet", {"question": ["q"] * n, "answer": ["a"] * n})
    f["pq_ints"] = _parquet(d / "ints.parquet", {"prompt": ["q"] * n, "chosen": [1] * n, "rejected": [2] * n})
    f["pq_bytes"] = _parquet(d / "bytes.parquet", {"prompt": [b"q"] * n, "chosen": [b"yes"] * n,
                                                   "rejected": [b"no"] * n})
    f["pq_lists"] = _parquet(d / "lists.parquet", {"prompt": ["q"] * n, "chosen": [[1, 2]] * n,
                                                   "rejected": [[3]] * n})
    f["pq_struct"] = _parquet(d / "struct.parquet", {"prompt": [{"text": "q"}] * n, "chosen": ["a"] * n,
                                                     "rejected": ["b"] * n})
    # right columns plus one JSON has no type for: good rows, the extra column ignored
    f["pq_extra"] = _parquet(d / "extra.parquet", {**{k: [v] * n for k, v in GOOD.items()},
                                                   "when": [datetime.datetime(2024, 1, 1)] * n})
    return f


@pytest.fixture(scope="module")
def tokenize():
    """The Ray Data tokenizing UDF itself (its constructor loads the tiny tokenizer)."""
    from simpo_ray.config import DataConfig
    from simpo_ray.rows import row_options

    options = row_options(DataConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT))
    return D.Tokenize("tiny", dataclasses.asdict(TinyModelConfig()), options, seed=0, eval_fraction=0.0)


def pipeline(tokenize, *paths, strict=True):
    """What prepare_datasets runs per file in Ray Data, without Ray: read -> tokenize
    -> the driver's verdict. Returns (dropped counts, kept triplets)."""
    errors, kept = [], []
    for p in paths:
        for raw in D.read_files_batch({"path": [str(p)]}):
            out = tokenize(raw)
            for i, err in enumerate(out["error"]):
                if err:
                    errors.append((out["source"][i], out["row"][i], err, out["reason"][i]))
                else:
                    kept.append({k: out[k][i] for k in ("row", "prompt_ids", "chosen_ids", "rejected_ids",
                                                        "truncated")})
    return D.summarize_errors(errors, strict=strict), kept


def _cfg(tmp_path, files, **data):
    return RunConfig.from_dict({"data": {"train_files": [str(f) for f in files], "eval_fraction": 0.0,
                                         "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT, **data},
                                "output": {"root": str(tmp_path), "name": "run"}})


# ---------------------------------------------------------------- rows
def test_hostile_rows_strict_stop_names_file_row_and_reason(corpus, tokenize):
    with pytest.raises(DataError) as e:
        pipeline(tokenize, corpus["rows"])
    msg, path = str(e.value), corpus["rows"]
    fatal = sum(v for k, v in EXPECTED.items() if k not in R.NON_FATAL)
    assert f"{fatal} malformed row(s)" in msg and "data.strict=false" in msg
    assert f"{path}: row 2: invalid JSON" in msg
    assert f"{path}: row 3: 'chosen' and 'rejected' must be text or message lists, got int and str" in msg
    assert f"{path}: row 4: 'prompt' must be a non-empty string or list of messages, got dict" in msg


def test_hostile_rows_lenient_drop_and_count_every_one(corpus, tokenize):
    dropped, kept = pipeline(tokenize, corpus["rows"], strict=False)
    assert dropped == EXPECTED
    assert sorted(t["row"] for t in kept) == GOOD_ROWS
    big = next(t for t in kept if t["row"] == GOOD_ROWS[1])  # the enormous row: kept, cut to size
    assert big["truncated"] and len(big["prompt_ids"]) == MAX_PROMPT
    assert len(big["prompt_ids"]) + max(len(big["chosen_ids"]), len(big["rejected_ids"])) <= MAX_LENGTH


def test_each_hostile_row_names_its_field(corpus, tokenize):
    """The message of every dropped row says what is wrong, in the words of its field."""
    by_row = {}
    for raw in D.read_files_batch({"path": [str(corpus["rows"])]}):
        out = tokenize(raw)
        by_row.update({n: (e, r) for n, e, r in zip(out["row"], out["error"], out["reason"]) if e})
    assert "'rejected' must be text or message lists, got str and bool" in by_row[5][0]
    assert "'prompt_ids' must be a list of token ids" in by_row[7][0]
    assert "'chosen_ids' holds token id 1000000000, beyond the model's vocabulary" in by_row[8][0]
    assert "'chosen_ids' must be a list of token ids" in by_row[9][0]
    assert by_row[10][0] == "empty chosen" and by_row[11][0] == "empty rejected"
    assert by_row[12][0] == "empty prompt" and "every prompt message is blank" in by_row[13][0]
    assert by_row[14][0] == "missing field 'chosen'"
    assert by_row[16][0].startswith("invalid UTF-8 at byte")
    assert "'prompt' is not valid Unicode (surrogates not allowed" in by_row[18][0]
    assert by_row[21] == ("chosen and rejected identical after truncation", R.TRUNCATED_SAME)


def test_data_inspect_agrees_with_the_training_path(corpus, tmp_path, capsys):
    from simpo_ray.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path, [corpus["rows"]]).to_dict()))
    assert main(["data", "inspect", str(cfg), "--histogram", str(tmp_path / "h.png")]) == 1  # strict
    assert f"{corpus['rows']}: row 2: invalid JSON" in capsys.readouterr().out
    assert main(["data", "inspect", str(cfg), "data.strict=false", "--json",
                 "--histogram", str(tmp_path / "h.png")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dropped"] == EXPECTED and rep["pairs"] == len(GOOD_ROWS) and rep["rows"] == len(ROWS)


def test_a_template_that_refuses_a_conversation_drops_that_row(tokenizer, tmp_path):
    """Gemma-style templates raise on a system turn: one row's reason, not a crash."""
    import copy

    from simpo_ray.inspect_data import inspect

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    p = tmp_path / "sys.jsonl"
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    p.write_bytes(_line(GOOD) + _line({"chosen": system + [{"role": "assistant", "content": "a"}],
                                       "rejected": system + [{"role": "assistant", "content": "b"}]}))
    rep = inspect(_cfg(tmp_path, [p], strict=False), tokenizer=tok)
    assert rep["dropped"] == {R.TOKENIZATION: 1} and rep["pairs"] == 1
    assert "row 2: chat template refused the conversation" in rep["first_offenders"][0]
    assert "System role not supported" in rep["first_offenders"][0]


# ---------------------------------------------------------------- whole files
@pytest.mark.parametrize("name, words", [
    ("noise_parquet", "Parquet magic bytes not found"),
    ("empty_parquet", "cannot be read"),
    ("noise_json", "not a valid JSON array"),
    ("cut_json", "not a valid JSON array"),
    ("latin1_csv", "invalid UTF-8 at line 3, byte 32"),
])
def test_an_unreadable_file_stops_the_run_in_both_modes(corpus, tokenize, tmp_path, capsys, name, words):
    from simpo_ray.cli import main

    path = corpus[name]
    for strict in (True, False):
        with pytest.raises(DataError) as e:
            pipeline(tokenize, corpus["pq_extra"], path, strict=strict)
        msg = str(e.value)
        assert "1 file(s) cannot be read (in strict and lenient mode)" in msg
        assert f"{path}" in msg and words in msg
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tmp_path, [path], strict=False).to_dict()))
    assert main(["data", "inspect", str(cfg), "--histogram", str(tmp_path / "h.png")]) == 1
    err = capsys.readouterr().err
    assert f"simpo-ray: {path}" in err and words in err


def test_a_binary_file_named_jsonl_is_every_line_refused(corpus, tokenize):
    with pytest.raises(DataError, match=rf"{corpus['noise_jsonl']}: row 1: invalid (UTF-8|JSON)"):
        pipeline(tokenize, corpus["noise_jsonl"])
    dropped, kept = pipeline(tokenize, corpus["noise_jsonl"], strict=False)
    lines = [x for x in corpus["noise_jsonl"].read_bytes().split(b"\n") if x.strip()]
    assert not kept and set(dropped) <= {R.INVALID_UTF8, R.INVALID_JSON}
    assert sum(dropped.values()) == len(lines)


def test_an_enormous_csv_field_is_read_and_truncated(corpus, tokenize):
    dropped, kept = pipeline(tokenize, corpus["huge_csv"])  # past csv's 128 KiB field limit
    assert dropped == {} and len(kept) == 1 and kept[0]["truncated"]
    assert len(kept[0]["prompt_ids"]) + len(kept[0]["chosen_ids"]) <= MAX_LENGTH


@pytest.mark.parametrize("name, reason, words", [
    ("pq_names", R.MISSING, "missing field 'chosen'"),
    ("pq_ints", R.WRONG_TYPE, "got int and int"),
    ("pq_bytes", R.WRONG_TYPE, "got bytes and bytes"),  # never the text "b'yes'"
    ("pq_lists", R.BAD_CONVERSATION, "'chosen[0]' must be a message"),
    ("pq_struct", R.WRONG_TYPE, "'prompt' must be a non-empty string or list of messages, got dict"),
])
def test_parquet_with_the_wrong_schema(corpus, tokenize, tmp_path, name, reason, words):
    from simpo_ray.inspect_data import inspect

    path = corpus[name]
    with pytest.raises(DataError, match=re.escape(f"{path}: row 1: ") + ".*" + re.escape(words)):
        pipeline(tokenize, path)
    dropped, kept = pipeline(tokenize, path, strict=False)
    assert dropped == {reason: 3} and not kept
    assert inspect(_cfg(tmp_path, [path], strict=False), tokenizer=tokenize.tok)["dropped"] == {reason: 3}


def test_a_column_json_has_no_type_for_does_not_hurt_good_rows(corpus, tokenize):
    dropped, kept = pipeline(tokenize, corpus["pq_extra"])
    assert dropped == {} and len(kept) == 3


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("text, field, words", [
    ("optim: {lr_rate: 1.0e-6}", "optim.lr_rate", "unknown key; known: lr, weight_decay"),
    ("optim: {warmup_ration: 0.1}", "optim.warmup_ration", "did you mean 'warmup_ratio'"),
    ("trian: {epochs: 1}", "trian", "did you mean 'train'"),
    ("simpo: {beta: 2.0, gama: 1.0}", "simpo.gama", "did you mean 'gamma'"),
    ("train: {num_workers: two}", "train.num_workers", "expected an integer"),
    ("train: {num_workers: 1.5}", "train.num_workers", "expected an integer"),
    ("data: {strict: 'maybe'}", "data.strict", "expected true/false"),
    ("data: {column_map: [prompt]}", "data.column_map", "expected a dict"),
    ("train: 5", "train", "expected a mapping"),
    ("optim: {lr: -1.0e-6}", "optim.lr", "must be > 0"),
    ("optim: {lr: .nan}", "optim.lr", "must be finite"),
    ("simpo: {beta: .nan}", "simpo.beta", "must be finite"),
    ("simpo: {beta: -2.0}", "simpo.beta", "must be > 0"),
    ("simpo: {gamma_beta_ratio: -0.5}", "simpo.gamma_beta_ratio", "finite number >= 0"),
    ("simpo: {label_smoothing: .inf}", "simpo.label_smoothing", "must be finite"),
    ("simpo: {sft_weight: -1}", "simpo.sft_weight", "must be >= 0"),
    ("optim: {warmup_ratio: 1.5}", "optim.warmup_ratio", "must be in [0, 1)"),
    ("optim: {weight_decay: -0.1}", "optim.weight_decay", "must be >= 0"),
    ("optim: {adam_beta2: 1.0}", "optim.adam_beta2", "must be in [0, 1)"),
    ("optim: {adam_beta1: -0.9}", "optim.adam_beta1", "must be in [0, 1)"),
    ("optim: {adam_eps: 0}", "optim.adam_eps", "must be > 0"),
    ("optim: {max_grad_norm: -1}", "optim.max_grad_norm", "must be > 0"),
    ("train: {micro_batch_size: -2}", "train.micro_batch_size", "must be > 0"),
    ("data: {eval_fraction: -0.1}", "data.eval_fraction", "must be in [0, 1)"),
    ("data: {max_length: 0}", "data.max_length", "must be > 0"),
    ("model: {tiny: {hidden_size: -64}}", "model.tiny.hidden_size", "must be > 0"),
])
def test_hostile_config_names_the_field(tmp_path, capsys, text, field, words):
    from simpo_ray.cli import main

    p = tmp_path / "c.yaml"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        RunConfig.from_yaml(p)
    assert e.value.path == field and words in str(e.value)
    assert main(["train", str(p), "--dry-run"]) == 2  # before anything starts
    assert f"simpo-ray: config field '{field}'" in capsys.readouterr().err


def test_hostile_overrides_and_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim: {lr: 1.0e-6}\n")
    with pytest.raises(ConfigError, match="'optim.lr': must be finite"):
        RunConfig.from_yaml(p, ["optim.lr=nan"])
    with pytest.raises(ConfigError, match="'optim.lr.x': 'lr' is not a section"):
        RunConfig.from_yaml(p, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match="override must look like key.sub=value"):
        RunConfig.from_yaml(p, ["optim.lr"])
    p.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(ConfigError, match="is not a YAML text file"):
        RunConfig.from_yaml(p)
    p.write_text("optim: {lr: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="is not a YAML text file"):
        RunConfig.from_yaml(tmp_path)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        RunConfig.from_yaml(p)
    p.write_text("")  # an empty file is the defaults, not an error
    assert RunConfig.from_yaml(p) == RunConfig()
