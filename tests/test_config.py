"""Config loading: strict types, unknown keys with did-you-mean, overrides, round trip."""

import dataclasses
import typing
from pathlib import Path

import pytest

from sidpt.config import Config, ConfigError, dumps_config, field_docs, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_file_and_overrides(tmp_path):
    p = write(tmp_path, '[run]\nseed = 3\n[model]\ndtype = "bfloat16"\n')
    cfg = load_config(p, ["--run.seed=7", "--run.name=exp one", '--model.path="/ckpt/x"'])
    assert (cfg.run.seed, cfg.run.name, cfg.model.path, cfg.model.dtype) == (7, "exp one", "/ckpt/x", "bfloat16")
    assert cfg.run.out_dir == "runs"  # untouched default


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, '[run]\nseed = "three"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: run.seed: expected int, got 'three' (str)"


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.seed: expected int, got True \(bool\)"):
        load_config(None, ["--run.seed=true"])


def test_choice_error_with_did_you_mean():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--model.dtype=bfloat61"])
    msg = str(e.value)
    assert "model.dtype: expected one of 'float32', 'bfloat16', 'float16', got 'bfloat61'" in msg
    assert "did you mean 'bfloat16'" in msg


def test_unknown_key_with_did_you_mean(tmp_path):
    p = write(tmp_path, "[model]\ndtyp = 'float32'\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "unknown key 'model.dtyp'; did you mean 'model.dtype'?" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown key 'modle'; did you mean 'model'\?"):
        load_config(None, ["--modle.size=debug"])


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("--run.seed", "bad override '--run.seed': expected --section.key=value"),
        ("run.seed=3", "bad override 'run.seed=3': expected --section.key=value"),
        ("--run..seed=3", "bad override '--run..seed=3': empty key component in 'run..seed'"),
        ("--run.seed.x=3", "run.seed"),
        ("--run=3", "run: expected a table, got 3"),
    ],
)
def test_bad_override_names_key(arg, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [arg])
    assert expected in str(e.value)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.toml: invalid TOML"):
        load_config(write(tmp_path, "[run\nseed=1"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--run.seed=11", '--run.name=a "quoted" name', "--model.dtype=float16"])
    save_config(cfg, tmp_path / "out" / "config.toml")
    assert load_config(tmp_path / "out" / "config.toml") == cfg
    assert "seed = 11" in dumps_config(cfg)


def test_every_field_is_documented():
    def walk(cls):
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert len(docs.get(f.name, "")) > 10, f"{cls.__name__}.{f.name} has no docstring"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    walk(Config)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    assert isinstance(load_config(path), Config)
