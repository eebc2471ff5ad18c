"""Pure parts of on-policy generation: seeds, prompt rows, prompt ids, pre-tokenized
training rows, the generate config's validation, the typed actor settings, the tiny
reward model's cache, and the one rerun check of `generate` and `iterate` (on tmp
folders, through the CLI where the check runs before Ray). No Ray, no engine."""

import dataclasses

import pytest

from simpo_ray.config import ConfigError, RunConfig
from simpo_ray.rows import TRUNCATED_SAME, ids_triplet, process_row, tokenize_triplet
from simpo_ray.prompts import encode_prompt, prompt_id_of, prompt_turns, sample_seed
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
    # the end is kept, after the BOS the model was pretrained with
    assert encode_prompt(tokenizer, turns, 5) == trip["prompt_ids"][:1] + trip["prompt_ids"][-4:]


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


def _example_cfg(tmp_path, *overrides):
    import os

    from tests.conftest import REPO

    return RunConfig.from_yaml(os.path.join(REPO, "examples", "onpolicy_tiny_cpu.yaml"),
                               [f"output.root={tmp_path}", "output.name=run", *overrides])


def test_actor_settings_cross_the_boundary_as_plain_dicts(tmp_path):
    import json

    from simpo_ray.generators import GeneratorSettings
    from simpo_ray.reward import ScorerSettings

    cfg = _example_cfg(tmp_path, "generate.temperature=0.7", "generate.engine_kwargs.max_num_seqs=8",
                       "model.dtype=float32", "generate.reward.batch_size=3")
    g, r = GeneratorSettings.from_config(cfg), ScorerSettings.from_config(cfg)
    assert (g.backend, g.temperature, g.num_samples, g.dtype) == (cfg.generate.backend, 0.7,
                                                                  cfg.generate.num_samples, "float32")
    assert g.engine_kwargs == cfg.generate.engine_kwargs and g.engine_kwargs["max_num_seqs"] == 8
    assert (r.name_or_path, r.batch_size, r.seed, r.tiny["hidden_size"]) == ("tiny", 3, 1, cfg.model.tiny.hidden_size)
    for s in (g, r):
        d = s.to_dict()
        assert json.loads(json.dumps(d)) == d  # plain values only
        assert type(s).from_dict(d) == s
        with pytest.raises(ValueError):
            type(s).from_dict(dict(d, tempreature=1.0))
    with pytest.raises(Exception):
        g.temperature = 1.0  # frozen


def test_tiny_reward_model_is_built_once_and_scores_one_value(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from simpo_ray.reward import ScorerSettings, reward_model_path

    monkeypatch.setenv("SIMPO_RAY_CACHE", str(tmp_path))
    s = ScorerSettings.from_config(_example_cfg(tmp_path))
    path = reward_model_path(s)
    assert path.startswith(str(tmp_path / "tiny-reward-"))
    stamp = (tmp_path / path / "model.safetensors").stat().st_mtime_ns
    assert reward_model_path(s) == path and (tmp_path / path / "model.safetensors").stat().st_mtime_ns == stamp
    assert reward_model_path(dataclasses.replace(s, seed=2)) != path  # another seed, another folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folder left
    assert AutoModelForSequenceClassification.from_pretrained(path).config.num_labels == 1
    assert reward_model_path(dataclasses.replace(s, name_or_path="org/rm")) == "org/rm"


def _prompts():
    return [{"prompt_id": "a", "prompt_ids": [1, 3, 9]}, {"prompt_id": "b", "prompt_ids": [1, 3, 7]}]


def test_generate_rerun_check_frees_resources_only(tmp_path):
    """The parts' manifest: resources may change (the same list `iterate` uses), sampling
    settings, policy, round and prompts may not; refusals name the dotted field."""
    from simpo_ray.generate import check_manifest

    out = tmp_path / "generated"
    check_manifest(out, _example_cfg(tmp_path), "tiny", 0, _prompts())
    assert (out / "manifest.json").exists()
    check_manifest(out, _example_cfg(tmp_path, "generate.reward.num_scorers=2", "generate.num_generators=3",
                                     "generate.reward.cpus_per_scorer=2", "generate.rounds=4"), "tiny", 0, _prompts())
    for args, field in ((("generate.temperature=0.5",), "generate.temperature"),
                        (("generate.reward.batch_size=2",), "generate.reward.batch_size"),
                        ((), "round")):
        with pytest.raises(ConfigError) as e:
            check_manifest(out, _example_cfg(tmp_path, *args), "tiny", 1 if field == "round" else 0, _prompts())
        assert e.value.path == field and field in str(e.value)
    with pytest.raises(ConfigError, match="prompts"):
        check_manifest(out, _example_cfg(tmp_path), "tiny", 0, _prompts()[:1])


def test_iterate_rerun_check_frees_the_same_resources(tmp_path):
    from simpo_ray.onpolicy import check_settings

    check_settings(_example_cfg(tmp_path))
    check_settings(_example_cfg(tmp_path, "generate.reward.num_scorers=2", "generate.keep_generators=true",
                                "generate.cpus_per_generator=2"))
    with pytest.raises(ConfigError) as e:
        check_settings(_example_cfg(tmp_path, "generate.temperature=0.5"))
    assert e.value.path == "generate.temperature"


def test_cli_refused_iterate_rerun_exits_2_without_a_traceback(tmp_path, capsys):
    """The settings check runs before Ray: a refused rerun never starts anything."""
    import os

    from simpo_ray.cli import main
    from simpo_ray.onpolicy import check_settings
    from tests.conftest import REPO

    check_settings(_example_cfg(tmp_path))  # the record a first run writes
    example = os.path.join(REPO, "examples", "onpolicy_tiny_cpu.yaml")
    assert main(["iterate", example, f"output.root={tmp_path}", "output.name=run", "generate.temperature=0.5"]) == 2
    err = capsys.readouterr().err
    assert "generate.temperature" in err and "other settings" in err and "Traceback" not in err


@pytest.mark.parametrize("cmd", ["generate", "iterate"])
@pytest.mark.parametrize("text", ["generate: {num_samples: [1,\n", "- just\n- a list\n"])
def test_cli_malformed_yaml_exits_2(tmp_path, capsys, cmd, text):
    from simpo_ray.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main([cmd, str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
