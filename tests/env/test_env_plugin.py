"""Environments and rewards plug in by name or import path; config.py stays a leaf."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from sidpt.env import ENVIRONMENTS, env_table, load_environment, load_reward, score
from sidpt.errors import ConfigError


def test_config_imports_no_environment():
    code = ("import sys, sidpt.config; bad = [m for m in sys.modules if m.startswith(('sidpt.env', 'sidpt.rollout', "
            "'sidpt.trainer', 'sidpt.controller'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_environment_by_name_validated_by_its_config():
    module, cfg = load_environment({"name": "search", "topk": 2, "n_entities": 40})
    assert module.__name__ == ENVIRONMENTS["search"] and (cfg.topk, cfg.n_entities) == (2, 40)
    table = env_table("search", cfg)
    assert table["name"] == "search" and table["max_turns"] == cfg.max_turns  # every default filled in
    with pytest.raises(ConfigError, match=r"unknown key 'env.topkk'; did you mean 'env.topk'"):
        load_environment({"name": "search", "topkk": 2})
    with pytest.raises(ConfigError, match=r"env.topk: expected int"):
        load_environment({"name": "search", "topk": "two"})
    with pytest.raises(ConfigError, match=r"env.topk: must be >= 1"):
        load_environment({"name": "search", "topk": 0})


def test_unknown_environment_names_the_key():
    with pytest.raises(ConfigError, match=r"env.name='nope': not one of .*no module 'nope'"):
        load_environment({"name": "nope"})
    with pytest.raises(ConfigError, match=r"module 'json' has no Config"):
        load_environment({"name": "json"})


def test_own_reward_function_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(sample, text, info):\n    return len(text) / 10 + sample.bonus\n"
        "def broken(sample, text, info):\n    raise KeyError('gold')\n"
        "def nan(sample, text, info):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("") is None
    fn = load_reward("my_rewards:length")
    ep = SimpleNamespace(sample=SimpleNamespace(id="q1", bonus=0.5), info={}, reward=0.0,
                         out=SimpleNamespace(tokens=[7, 7, 1, 2, 3], prompt_len=2))
    score([ep], fn, lambda ids: "abc" * len(ids))  # the response: the 3 tokens after the prompt
    assert ep.reward == 9 / 10 + 0.5
    with pytest.raises(ConfigError, match=r"task.reward='my_rewards:broken' failed on sample 'q1': KeyError"):
        score([ep], load_reward("my_rewards:broken"), str)
    with pytest.raises(ConfigError, match=r"failed on sample 'q1': returned nan"):
        score([ep], load_reward("my_rewards:nan"), str)
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_mod'"):
        load_reward("no_such_mod:f")
    with pytest.raises(ConfigError, match=r"has no function 'missing'"):
        load_reward("my_rewards:missing")
    with pytest.raises(ConfigError, match=r"expected 'module:function'"):
        load_reward("my_rewards")


def test_entry_names_env_and_reward_mistakes_before_running(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for arg, want in (("--env.topkk=3", "configs/debug.toml: unknown key 'env.topkk'; did you mean 'env.topk'?"),
                      ("--task.reward=nomod:f", "task.reward='nomod:f': cannot import module 'nomod'")):
        out = subprocess.run([sys.executable, "-m", "sidpt", "configs/debug.toml", arg, f"--run.out_dir={tmp_path}"],
                             cwd=root, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and want in out.stderr, out.stderr
        assert not (tmp_path / "debug").exists()  # nothing written
