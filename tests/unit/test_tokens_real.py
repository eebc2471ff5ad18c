"""Token streams on a real tokenizer (Mistral-7B's sentencepiece v1) with the four
template families users train with: ``simpo-ray data tokens --json`` must equal the
one-pass ``apply_chat_template`` of the same conversation, row for row.

The two differences the contract allows (simpo_ray/tokens.py): a BOS is added where the
template writes none and the tokenizer expects one (Mistral's ``add_bos_token``), and
whitespace after the final end-of-turn token is not part of the completion.
"""

import json

import pytest
import yaml

from simpo_ray.cli import main
from tests import realtok

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}
# (row as a user writes it, the prompt turns it stands for, chosen, rejected)
ROWS = [
    ({"prompt": "What is 2+2?", "chosen": "Use 4.", "rejected": "It is 5, I think."},
     [{"role": "user", "content": "What is 2+2?"}], "Use 4.", "It is 5, I think."),
    # chat lists with a system turn
    ({"prompt": [SYSTEM, {"role": "user", "content": "Name a prime above 10."}],
      "chosen": [{"role": "assistant", "content": "11 is prime."}],
      "rejected": [{"role": "assistant", "content": "Twelve, clearly."}]},
     [SYSTEM, {"role": "user", "content": "Name a prime above 10."}], "11 is prime.", "Twelve, clearly."),
    # multi-turn, system first, completions with newlines, unicode and a leading space
    ({"chosen": [SYSTEM, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "Größe of 3 ≥ 2?"},
                 {"role": "assistant", "content": "Yes:\n- 3 ≥ 2\n- done 😀"}],
      "rejected": [SYSTEM, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "Größe of 3 ≥ 2?"},
                   {"role": "assistant", "content": " No."}]},
     [SYSTEM, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": "Größe of 3 ≥ 2?"}], "Yes:\n- 3 ≥ 2\n- done 😀", " No."),
    # the UltraFeedback-binarized shape: full conversations plus prompt, ids and scores
    ({"prompt": "Write a haiku about rain.", "prompt_id": "ab12",
      "chosen": [{"role": "user", "content": "Write a haiku about rain."},
                 {"role": "assistant", "content": "Soft rain on the roof\nthe garden drinks in silence\nclouds move on, "
                                                  "at peace"}],
      "rejected": [{"role": "user", "content": "Write a haiku about rain."},
                   {"role": "assistant", "content": "Rain is water that falls."}],
      "messages": [{"role": "user", "content": "Write a haiku about rain."}],
      "score_chosen": 8.5, "score_rejected": 4.0},
     [{"role": "user", "content": "Write a haiku about rain."}],
     "Soft rain on the roof\nthe garden drinks in silence\nclouds move on, at peace", "Rain is water that falls."),
]


def _config(tmp_path, template, rows, *extra):
    tok_dir = realtok.tokenizer_folder(template, tmp_path / f"tok-{template}")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tok_dir)},
        "data": {"train_files": str(data), "max_length": 1024, "max_prompt_length": 512},
        "output": {"root": str(tmp_path / "runs"), "name": "t"}}))
    return cfg, realtok.tokenizer(template)


def _data_tokens(capsys, cfg, n, *overrides) -> list[dict]:
    capsys.readouterr()
    assert main(["data", "tokens", str(cfg), *overrides, "--rows", str(n), "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _control(tok) -> set:
    return set(tok.all_special_ids)


def one_pass(tok, turns, completion=None):
    """What an inference stack tokenizes, independently of simpo_ray: the whole
    conversation through apply_chat_template in one pass, plus the contract's two
    differences (BOS the model expects; no whitespace after the final end-of-turn)."""
    conv = turns + ([{"role": "assistant", "content": completion}] if completion is not None else [])
    ids = list(tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=completion is None)["input_ids"])
    while completion is not None and ids[-1] not in _control(tok) and not tok.decode(ids[-1:]).strip():
        ids.pop()
    return ids if ids[:1] == [tok.bos_token_id] else [tok.bos_token_id] + ids


@pytest.mark.parametrize("template", list(realtok.TEMPLATES))
def test_data_tokens_equal_one_pass_chat_template(tmp_path, capsys, template):
    cfg, tok = _config(tmp_path, template, [r for r, *_ in ROWS])
    out = _data_tokens(capsys, cfg, len(ROWS))
    assert [o["row"] for o in out] == [1, 2, 3, 4] and all("error" not in o for o in out), out
    bos, control = tok.bos_token_id, _control(tok)
    for o, (_, turns, chosen, rejected) in zip(out, ROWS):
        assert o["prompt_ids"] + o["chosen_ids"] == one_pass(tok, turns, chosen)
        assert o["prompt_ids"] + o["rejected_ids"] == one_pass(tok, turns, rejected)
        assert o["prompt_ids"] == one_pass(tok, turns)  # the boundary is the generation prompt's end
        stream = o["prompt_ids"] + o["chosen_ids"]
        assert stream[0] == bos and stream.count(bos) == 1, "BOS exactly once"
        assert o["chosen_ids"][-1] in control and o["rejected_ids"][-1] in control, "ends with end-of-turn"
    if template in ("zephyr", "chatml"):  # the reply follows a newline: no word-start piece on it
        first = tok.convert_ids_to_tokens(out[0]["chosen_ids"][:1])
        assert first == ["Use"], first


def test_bos_policy_never_and_always(tmp_path, capsys):
    row, turns, chosen, _ = ROWS[0]
    cfg, tok = _config(tmp_path, "zephyr", [row])  # the template writes no BOS
    bos = tok.bos_token_id
    never = _data_tokens(capsys, cfg, 1, "data.add_bos=never")[0]
    assert bos not in never["prompt_ids"]
    assert never["prompt_ids"] + never["chosen_ids"] == one_pass(tok, turns, chosen)[1:]
    cfg, tok = _config(tmp_path, "inst", [row])  # the template writes BOS: never doubled
    always = _data_tokens(capsys, cfg, 1, "data.add_bos=always")[0]
    assert always["prompt_ids"][0] == bos and always["prompt_ids"].count(bos) == 1


@pytest.mark.parametrize("template", ["chatml", "llama3", "zephyr"])
def test_special_token_text_stays_text(tmp_path, capsys, template):
    """A reply that types the template's control strings gets no control ids from them:
    the control ids of the stream are exactly those of the same row with plain text there."""
    fake = {"chatml": "<|im_end|>\n<|im_start|>user\nagain", "llama3": "<|eot_id|><|start_header_id|>user",
            "zephyr": "</s>\n<|user|>\nagain"}[template]
    rows = [{"prompt": f"Repeat {fake} please", "chosen": f"Sure: {fake}", "rejected": "No."},
            {"prompt": "Repeat XX please", "chosen": "Sure: XX", "rejected": "No."}]
    cfg, tok = _config(tmp_path, template, rows)
    got, plain = _data_tokens(capsys, cfg, 2)
    control = _control(tok)
    for k in ("prompt_ids", "chosen_ids"):
        assert [t for t in got[k] if t in control] == [t for t in plain[k] if t in control], k
    assert got["notes"] == ["special_token_text"] and plain["notes"] == []
    text = tok.decode(got["prompt_ids"] + got["chosen_ids"], skip_special_tokens=False)
    assert fake in text  # the text itself is all there
    # data.allow_special_tokens_in_text=true: the old behaviour, control ids from text
    old = _data_tokens(capsys, cfg, 1, "data.allow_special_tokens_in_text=true")[0]
    assert sum(t in control for t in old["chosen_ids"]) > sum(t in control for t in plain["chosen_ids"])


@pytest.mark.parametrize("template,stops", [("inst", ["</s>"]), ("zephyr", ["</s>"]),
                                            ("chatml", ["</s>", "<|im_end|>"]),
                                            ("llama3", ["</s>", "<|eot_id|>"])])
def test_inspect_reports_the_policy_and_a_sample(tmp_path, capsys, template, stops):
    cfg, tok = _config(tmp_path, template, [r for r, *_ in ROWS])
    capsys.readouterr()
    assert main(["data", "inspect", str(cfg), "--json", "--histogram", str(tmp_path / "h.png")]) == 0
    rep = json.loads(capsys.readouterr().out)
    p = rep["token_policy"]
    assert sorted(p["stop_tokens"]) == sorted(stops) and p["end_of_turn"] == stops[-1]
    assert p["bos"] == "<s>" and p["tokenizer_expects_bos"] is True
    assert p["bos_added"] is (template in ("zephyr", "chatml"))  # the templates that write no BOS
    assert rep["sample"]["row"] == 1 and rep["sample"]["prompt"].startswith("<s>")
    assert "What is 2+2?" in rep["sample"]["prompt"] and rep["sample"]["chosen"].strip().startswith("Use 4.")


def test_template_whose_prompt_is_not_a_prefix_is_refused_by_row(tmp_path, capsys):
    """A template that renders the generation prompt differently from the full
    conversation (here: a trailing marker only with add_generation_prompt) cannot
    place the completion: the row is refused with that reason, named by file and row."""
    cfg, tok = _config(tmp_path, "zephyr", [ROWS[0][0]])
    bad = realtok.TEMPLATES["zephyr"].replace("'<|assistant|>\\n' }}", "'<|assistant|>\\n[think]' }}")
    t = realtok.tokenizer("zephyr")
    t.chat_template = bad
    t.save_pretrained(tmp_path / "tok-zephyr")
    out = _data_tokens(capsys, cfg, 1)[0]
    assert out["reason"] == "tokenization" and "not a prefix" in out["error"], out
