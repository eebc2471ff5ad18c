"""`simpo-ray eval` and `compare` before any Ray work: what a model argument resolves to
(a run folder's model/, its method from the card), the loss configs compare trains, and
bad input refused with exit 2 and the field, no traceback."""

import pytest

from simpo_ray.cli import main
from simpo_ray.compare import compare_dir, loss_config
from simpo_ray.config import ConfigError, RunConfig
from simpo_ray.evaluation import card_config, eval_config, resolve_model
from simpo_ray.export import model_card

from ..conftest import REPO

TINY_CPU = f"{REPO}/examples/tiny_cpu.yaml"


def _model_folder(path, cfg):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "README.md").write_text(model_card(cfg, {"fingerprint": "f"}, {"loss": 0.5}, 3, "end of training"))
    return path


def test_a_run_folder_resolves_to_its_model_and_its_method(tmp_path):
    cfg = RunConfig.from_yaml(TINY_CPU, ["simpo.loss=dpo", "simpo.beta=0.1"])
    _model_folder(tmp_path / "run" / "model", cfg)
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    for arg in (tmp_path / "run", tmp_path / "run" / "model"):
        m = resolve_model(str(arg))
        assert (m.label, m.loss, m.path, m.run_dir) == ("run", "dpo", str(tmp_path / "run" / "model"),
                                                        str(tmp_path / "run"))
    assert card_config(tmp_path / "run" / "model")["simpo"]["beta"] == 0.1
    with pytest.raises(ConfigError, match="neither a model folder"):
        resolve_model(str(tmp_path))


def test_eval_config_holds_every_row_out_and_keeps_the_tokenization():
    base = RunConfig.from_yaml(TINY_CPU, ["data.max_length=300"])
    cfg = eval_config(base, ["a.jsonl", "b.jsonl"], 8, 16, "transformers", "tiny")
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"] and cfg.data.eval_fraction == 0.0
    assert cfg.generate.prompt_files == ["a.jsonl", "b.jsonl"] and cfg.generate.max_prompts == 8
    assert (cfg.generate.max_tokens, cfg.generate.backend, cfg.data.max_length) == (16, "transformers", 300)


def test_compare_trains_each_loss_with_its_recipe_beta_unless_beta_is_given():
    cfg = RunConfig.from_yaml(TINY_CPU, [])
    assert (loss_config(cfg, "simpo", False).simpo.beta, loss_config(cfg, "dpo", False).simpo.beta) == (2.5, 0.1)
    assert loss_config(cfg, "dpo", True).simpo.beta == 2.5 and loss_config(cfg, "dpo", False).output.export
    assert compare_dir(cfg).name == "tiny-cpu-compare" and compare_dir(cfg).is_absolute()


@pytest.mark.parametrize("argv, field", [
    (["compare", TINY_CPU, "--losses", "simpo,nope"], "--losses"),
    (["compare", TINY_CPU, "--losses", "simpo,sft"], "--losses"),
    (["compare", TINY_CPU, "--losses", "simpo,simpo"], "--losses"),
    (["compare", TINY_CPU, "optim.lrr=1", "--losses", "simpo"], "optim.lrr"),
])
def test_bad_compare_input_exits_2_naming_the_field(argv, field, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"'{field}'" in err and "Traceback" not in err


def test_eval_of_a_folder_without_a_model_exits_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--data", "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "neither a model folder" in err and "Traceback" not in err


def test_categories_are_keyed_like_the_data_layer_keys_its_rows(tmp_path):
    from simpo_ray.evaluation import _categories
    from simpo_ray.sources import iter_file_rows

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "category": "math"}\n'
                 '{"prompt": "d", "chosen": "e", "rejected": "f"}\n'
                 '{"prompt": "g", "chosen": "h", "rejected": "i", "category": "code"}\n')
    rows = [n for n, _ in iter_file_rows(str(f))]  # the row numbers training and eval key pairs by
    assert _categories([str(f)]) == {(str(f), rows[0]): "math", (str(f), rows[2]): "code"}
