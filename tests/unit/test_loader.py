"""The one YAML loader, override setter and rerun check that every command uses."""

import json

import pytest

from simpo_ray.cli import main
from simpo_ray.config import ConfigError, apply_overrides, check_rerun, load_yaml, parse_override, set_dotted

BOMB = "\n".join(
    [f"l0: &l0 {{{', '.join(f'k{i}: 1' for i in range(9))}}}"]
    + [f"l{n}: &l{n} {{{', '.join(f'k{i}: *l{n - 1}' for i in range(9))}}}" for n in range(1, 8)]
    + [f"deepspeed: {{overrides: {{{', '.join(f'k{i}: *l7' for i in range(9))}}}}}"])


@pytest.mark.parametrize("text,reason", [
    ("model: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "mapping at the top level"),
    (BOMB, "expands to more than"),
])
def test_bad_files_are_config_errors_naming_the_file(tmp_path, text, reason):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=reason) as e:
        load_yaml(p)
    assert str(p) in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml", "sweep")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not a YAML text file"):
        load_yaml(tmp_path / "bin.yaml")


@pytest.mark.parametrize("command", ["train", "sft", "tune", "generate", "iterate", "data inspect", "plan"])
def test_every_command_exits_2_on_a_malformed_config(tmp_path, capsys, command):
    p = tmp_path / "bad.yaml"
    p.write_text("train: {max_steps: [1\n")
    assert main([*command.split(), str(p)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "Traceback" not in err


def test_overrides_parse_yaml_values_and_set_dotted_keys():
    assert parse_override("optim.lr=1e-6") == ("optim.lr", "1e-6")  # YAML's float needs a dot; coerced later
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=") == ("a.b", "")
    for bad in ("nokey", "=3"):
        with pytest.raises(ConfigError, match="key.sub=value"):
            parse_override(bad)
    d = {"train": {"max_steps": 3}}
    out = set_dotted(d, "train.lr.x", 1)
    assert out == {"train": {"max_steps": 3, "lr": {"x": 1}}} and d == {"train": {"max_steps": 3}}
    with pytest.raises(ConfigError, match="'max_steps' is not a section"):
        apply_overrides(d, ["train.max_steps.x=1"])


def test_rerun_check_refuses_other_settings_and_lets_resources_change(tmp_path):
    rec = tmp_path / "run" / "settings.json"
    free = ("generate.num_generators",)
    check_rerun(rec, {"generate": {"temperature": 0.8, "num_generators": 1}}, "samples", free)
    assert json.loads(rec.read_text()) == {"generate": {"temperature": 0.8}}
    check_rerun(rec, {"generate": {"temperature": 0.8, "num_generators": 4}}, "samples", free)
    with pytest.raises(ConfigError, match=r"generate\.temperature: 0\.8 -> 1\.0") as e:
        check_rerun(rec, {"generate": {"temperature": 1.0, "num_generators": 1}}, "samples", free)
    assert e.value.path == "generate.temperature" and str(rec.parent) in str(e.value)
    # allowed: the change is returned and becomes the record
    assert check_rerun(rec, {"generate": {"temperature": 1.0}}, "samples", free, allow=True) == [
        "generate.temperature: 0.8 -> 1.0"]
    assert check_rerun(rec, {"generate": {"temperature": 1.0}}, "samples", free) == []
