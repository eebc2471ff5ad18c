"""Pure parts of on-policy generation: seeds, prompt rows, prompt ids, pre-tokenized
training rows, and the generate config's validation. No Ray, no engine."""

import pytest

from simpo_ray.config import ConfigError, RunConfig
from simpo_ray.data import TRUNCATED_SAME, ids_triplet, process_row, tokenize_triplet
from simpo_ray.generate import encode_prompt, prompt_id_of, prompt_turns, sample_seed
from simpo_ray.sources import RowError


def test_sample_seeds_are_a_function_of_the_key():
    assert sample_seed(0, 1, "p1", 0) == sample_seed(0, 1, "p1", 0)
    seeds = {sample_seed(0, r, p, j) for r in (0, 1) for p in ("p1", "p2") for j in range(4)}
    assert len(seeds) == 16 and all(0 <= x < 2**31 for x in seeds)


def test_prompt_shapes():
    user = [{"role": "user", "content": "hi"}]
    assert prompt_turns({"prompt": "hi"}) == user
    assert prompt_turns({"prompt": user}) == user
    assert prompt_turns({"question": "hi"}, {"prompt": "question"}) == user
    # UltraFeedback-binarized without a prompt column: the turns before the answer
    conv = user + [{"role": "assistant", "content": "hello"}]
    assert prompt_turns({"chosen": conv, "rejected": conv}) == user
    for bad in ({"prompt": "  "}, {"prompt": 3}, {"other": "x"}):
        with pytest.raises(RowError):
            prompt_turns(bad)


def test_prompt_ids_come_from_the_column_or_the_prompt():
    user = [{"role": "user", "content": "hi"}]
    assert prompt_id_of({"prompt_id": 17}, user) == "17"
    assert prompt_id_of({}, user) == prompt_id_of({"prompt_id": ""}, user) != prompt_id_of({}, user * 2)


def test_prompt_ids_match_training_rendering(tokenizer):
    turns = [{"role": "user", "content": "What is 2 + 2?"}]
    trip = tokenize_triplet(tokenizer, turns, "4.", "5.", max_length=256, max_prompt_length=128)
    assert encode_prompt(tokenizer, turns, 128) == trip["prompt_ids"]
    assert encode_prompt(tokenizer, turns, 5) == trip["prompt_ids"][-5:]  # the end is kept


def _row(**ids):
    base = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b",
            "prompt_ids": [1, 3, 9], "chosen_ids": [40, 41, 2], "rejected_ids": [50, 2]}
    return dict(base, **ids)


def test_pre_tokenized_rows_train_on_their_own_ids(tokenizer):
    # the ids are deliberately not what the text tokenizes to: they must pass unchanged
    turns, trip = process_row(tokenizer, _row(), max_length=64, max_prompt_length=32)
    assert turns == [{"role": "user", "content": "q"}]
    assert (trip["prompt_ids"], trip["chosen_ids"], trip["rejected_ids"]) == ([1, 3, 9], [40, 41, 2], [50, 2])
    assert not trip["truncated"] and trip["chosen_len"] == 3


def test_pre_tokenized_rows_truncate_like_text_rows():
    trip = ids_triplet(_row(prompt_ids=list(range(10)), chosen_ids=[7] * 9, rejected_ids=[8] * 3),
                       max_length=8, max_prompt_length=4)
    assert trip["prompt_ids"] == [6, 7, 8, 9] and trip["chosen_ids"] == [7] * 4 and trip["rejected_ids"] == [8] * 3
    assert trip["truncated"] and (trip["prompt_len"], trip["chosen_len"]) == (10, 9)
    with pytest.raises(RowError) as e:
        ids_triplet(_row(chosen_ids=[5, 5, 1], rejected_ids=[5, 5, 2]), max_length=5, max_prompt_length=3)
    assert e.value.reason == TRUNCATED_SAME


@pytest.mark.parametrize("bad", [{"chosen_ids": []}, {"rejected_ids": "12"}, {"prompt_ids": [1, -2]},
                                 {"chosen_ids": [1.5]}])
def test_bad_ids_are_row_errors(bad):
    with pytest.raises(RowError):
        ids_triplet(_row(**bad), max_length=64, max_prompt_length=32)


def test_generate_config_defaults_are_the_papers_sampling():
    g = RunConfig().generate
    assert (g.temperature, g.top_p, g.num_samples, g.backend) == (0.8, 0.95, 5, "vllm")
    assert not g.reward.trust_remote_code


@pytest.mark.parametrize("key,value,field", [
    ("backend", "hf", "generate.backend"),
    ("num_samples", 1, "generate.num_samples"),
    ("top_p", 0.0, "generate.top_p"),
    ("tensor_parallel_size", 2, "generate.tensor_parallel_size"),
    ("engine_kwargs", {"seed": 3}, "generate.engine_kwargs.seed"),
    ("reward", {"batch_size": 0}, "generate.reward.batch_size"),
    ("reward", {"nme_or_path": "x"}, "generate.reward.nme_or_path"),
])
def test_generate_config_errors_name_the_field(key, value, field):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"generate": {key: value}})
    assert e.value.path == field


def test_cli_generate_and_iterate_dry_run(capsys):
    import os

    from simpo_ray.cli import main
    from tests.conftest import REPO

    example = os.path.join(REPO, "examples", "onpolicy_tiny_cpu.yaml")
    for cmd in ("generate", "iterate"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert main([cmd, example, "generate.num_samples=3", "--dry-run"]) == 0
        assert "num_samples: 3" in capsys.readouterr().out
    assert main(["iterate", example, "--rounds", "3", "--dry-run"]) == 0
    assert "rounds: 3" in capsys.readouterr().out
    assert main(["iterate", example, "--rounds", "0"]) == 2
    assert "generate.rounds" in capsys.readouterr().err
