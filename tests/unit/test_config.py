import pytest

from simpo_ray.config import OBJECTIVE, ConfigError, RunConfig
from simpo_ray.sections import LOSS_NAMES


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = RunConfig.from_dict({"simpo": {"beta": 10.0, "gamma_beta_ratio": 0.3}, "train": {"num_workers": 4}})
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(p) == cfg


def test_overrides_apply_and_parse_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1.0e-6\n")
    cfg = RunConfig.from_yaml(p, ["optim.lr=3e-7", "train.num_workers=4", "model.gradient_checkpointing=true",
                                  "simpo.gamma=1.5", "simpo.gamma_beta_ratio=null"])
    assert cfg.optim.lr == pytest.approx(3e-7)
    assert cfg.train.num_workers == 4 and cfg.model.gradient_checkpointing is True
    assert cfg.simpo.resolved_gamma == 1.5 and cfg.simpo.resolved_gamma_beta_ratio == pytest.approx(1.5 / 2.0)


@pytest.mark.parametrize("data, field, words", [
    ({"optim": {"lrr": 1e-6}}, "optim.lrr", "did you mean 'lr'"),
    ({"train": {"num_workers": "two"}}, "train.num_workers", "expected an integer"),
    ({"simpo": {"beta": -1.0}}, "simpo.beta", "must be > 0"),
    ({"simpo": {"gamma": 1.0}}, "simpo.gamma_beta_ratio", "exactly one"),
    ({"simpo": {"gamma_beta_ratio": None}}, "simpo.gamma_beta_ratio", "exactly one"),
    ({"simpo": {"loss": "kto"}}, "simpo.loss", "must be one of"),
    ({"model": {"dtype": "float16"}}, "model.dtype", "must be one of"),
    ({"optim": {"lr": float("nan")}}, "optim.lr", "finite"),
    ({"train": {"total_batch_size": 10, "micro_batch_size": 2, "num_workers": 2}},
     "train.total_batch_size", "not divisible"),
    ({"data": {"max_length": 128, "max_prompt_length": 128}}, "data.max_prompt_length", "below max_length"),
    ({"bogus": {}}, "bogus", "unknown key"),
])
def test_validation_names_the_field(data, field, words):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(data)
    assert e.value.path == field
    assert words in str(e.value)


def test_gradient_accumulation_keeps_total_batch():
    for workers, accum in ((1, 64), (2, 32), (8, 8), (16, 4)):
        cfg = RunConfig.from_dict({"train": {"num_workers": workers, "micro_batch_size": 2,
                                             "total_batch_size": 128}})
        assert cfg.train.grad_accum_steps == accum
        assert cfg.train.grad_accum_steps * workers * 2 == 128


def test_defaults_are_the_papers_method():
    cfg = RunConfig()
    assert cfg.simpo.loss == "simpo" and cfg.simpo.sft_weight == 0.0
    assert 2.0 <= cfg.simpo.beta <= 10.0
    assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_ratio == 0.1
    assert cfg.train.total_batch_size == 128
    assert OBJECTIVE == "eval/rewards/accuracies"


def test_loss_names_come_from_the_loss_table():
    from simpo_ray import objective

    assert LOSS_NAMES is objective.LOSS_NAMES
    assert RunConfig.from_dict({"simpo": {"loss": "sft"}}).simpo.loss == "sft"


def test_sections_are_importable_from_config():
    from simpo_ray import config, sections, sections_generate, sections_output

    for name in config.__all__:
        assert hasattr(config, name), name
    for name in ("ConfigError", "TinyModelConfig", "ModelConfig", "DataConfig", "SimPOConfig", "OptimConfig",
                 "TrainConfig", "DeepSpeedConfig", "RayConfig"):
        assert getattr(config, name) is getattr(sections, name)
    assert config.OutputConfig is sections_output.OutputConfig
    for name in ("RewardConfig", "GenerateConfig"):
        assert getattr(config, name) is getattr(sections_generate, name)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")
