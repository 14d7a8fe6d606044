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
    assert "model.dtype: expected one of 'float32', 'bfloat16', 'float16', 'float64', got 'bfloat61'" in msg
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


# -- issue 14, item 6: every value that can be checked is checked at load, naming the key ---------

@pytest.mark.parametrize("override, match", [
    ("--algo.correction=bogus", r"algo.correction: expected one of 'none', .* got 'bogus'"),
    ("--rollout.precision=bogus", r"rollout.precision: expected one of 'native', .* got 'bogus'"),
    ("--rollout.max_new_tokens=0", r"rollout.max_new_tokens=0: must be >= 1"),
    ("--sft.batch_size=0", r"sft.batch_size=0: must be >= 1"),
    ("--run.steps=-1", r"run.steps=-1: must be >= 0"),
    ("--rollout.group_size=1", r"rollout.group_size=1: algo.advantage='grpo' compares the samples of a group"),
    ("--train.lr=0", r"train.lr=0.0: must be > 0"),
    ("--rollout.top_p=1.5", r"rollout.top_p=1.5: must be in \(0, 1\]"),
    ("--rollout.temperature=-1", r"rollout.temperature=-1.0: must be >= 0"),
    ("--train.min_lr_frac=2", r"train.min_lr_frac=2.0: must be <= 1"),
    ("--task.too_long=drop", r"task.too_long: expected one of 'error', 'skip', got 'drop'"),
    ("--model.numerics=fast", r"model.numerics: expected one of 'default', 'exact', got 'fast'"),
    ("--rollout.speculative=-1", r"rollout.speculative=-1: must be >= 0"),
    ("--rollout.speculative=4", r"rollout.speculative=4: the verifier is the exact policy; set model.numerics='exact'"),
])
def test_bad_values_fail_at_load_naming_the_key(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "debug.toml", [override])


@pytest.mark.parametrize("override, match", [
    ("--rollout.temperature=0.7", r"rollout.temperature=0.7: model.numerics='exact' needs 1.0"),
    ("--rollout.top_p=0.9", r"rollout.top_p=0.9: model.numerics='exact' needs 1.0"),
    ("--rollout.precision=emulated-bf16", r"rollout.precision='emulated-bf16': model.numerics='exact' needs 'native'"),
    ("--model.dtype=bfloat16", r"model.dtype='bfloat16': model.numerics='exact' needs 'float32'"),
    ("--model.dtype=float64", r"model.dtype='float64': model.numerics='exact' needs 'float32'"),
])
def test_exact_numerics_refuses_what_would_be_a_mismatch(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "debug.toml", ["--model.numerics=exact", override])
    assert load_config(ROOT / "configs" / "debug.toml", ["--model.numerics=exact"]).model.numerics == "exact"


def test_group_of_one_is_fine_with_a_batch_baseline():
    cfg = load_config(ROOT / "configs" / "debug.toml", ["--rollout.group_size=1", "--algo.advantage=reinforce_pp"])
    assert cfg.rollout.group_size == 1


def test_choice_lists_equal_the_roles_own():
    """config.py lists the choices itself (it imports nothing of the roles); they must not drift."""
    from sidpt.config import AlgoConfig, RolloutConfig
    from sidpt.rl.correction import CORRECTION_MODES
    from sidpt.rollout.precision import FORMATS

    hints = typing.get_type_hints(AlgoConfig)
    assert typing.get_args(hints["correction"]) == CORRECTION_MODES
    prec = typing.get_args(typing.get_type_hints(RolloutConfig)["precision"])
    assert prec == ("native", *(f"emulated-{f}" for f in FORMATS))
    from sidpt.config import TrainConfig
    from sidpt.schedule import POLICIES
    assert typing.get_args(typing.get_type_hints(TrainConfig)["schedule"]) == POLICIES


@pytest.mark.parametrize("override, match", [
    ("--run.placement=colocated", r"run.placement='colocated': run.pipeline='async' runs on disaggregated placement"),
    ("--run.eval_every=2", r"run.eval_every=2: run.pipeline='async'"),
    ("--run.verify_publish=true", r"run.verify_publish=True: run.pipeline='async'"),
    ("--rollout.max_staleness=-1", r"rollout.max_staleness=-1: must be >= 0"),
    ("--train.schedule=lifo", r"train.schedule: expected one of 'fifo', .* got 'lifo'"),
])
def test_async_pipeline_refuses_what_it_cannot_run(override, match):
    base = ["--run.pipeline=async", "--run.placement=disaggregated", "--run.rollout_ranks=1"]
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "echo.toml", [*base, override])
    assert load_config(ROOT / "configs" / "echo.toml", base).run.pipeline == "async"


def test_config_path_that_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a TOML config file"):
        load_config(tmp_path)
    blob = tmp_path / "w.bin"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match="w.bin: not a TOML config file"):
        load_config(blob)


def test_main_prints_one_line_for_user_errors(tmp_path, capsys):
    from sidpt.__main__ import main

    assert main(["--run.steps=1"]) == 2  # no config file: not the built-in defaults
    assert "the first argument must be a config file" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err


def test_non_utf8_data_names_file_and_line(tmp_path):
    from sidpt.env.search.bm25 import CorpusError, load_corpus
    from sidpt.env.search.env import DataError, load_questions

    q = tmp_path / "train.jsonl"
    q.write_bytes(b'{"question": "a?", "answers": ["b"]}\n{"question": "caf\xe9?", "answers": ["b"]}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_questions(q)
    c = tmp_path / "corpus.jsonl"
    c.write_bytes(b'{"id": "1", "contents": "x"}\n\n{"id": "2", "contents": "\xff"}\n')
    with pytest.raises(CorpusError, match=r"corpus.jsonl:3: not UTF-8 text"):
        load_corpus(c)


def test_questions_longer_than_max_model_len_are_named_or_skipped(tmp_path):
    from sidpt.data import fit_questions
    from sidpt.env.search.env import load_questions

    q = tmp_path / "heldout.jsonl"
    q.write_text('{"id": "q1", "question": "short", "answers": ["a"]}\n'
                 '{"id": "q2", "question": "long long long", "answers": ["a"]}\n')
    qs = load_questions(q)
    with pytest.raises(ConfigError, match=r"heldout.jsonl:2: question 'q2' has a prompt of 30 tokens.*max_model_len=20"):
        fit_questions(qs, [10, 30], 20, "error", str(q))
    kept, n_out = fit_questions(qs, [10, 30], 20, "skip", str(q))
    assert [k.id for k in kept] == ["q1"] and n_out == 1


def test_tokenizer_larger_than_the_model_is_refused():
    from sidpt.startup import check_vocab

    check_vocab(49152, 49152, "ckpt")
    check_vocab(49152, 49280, "ckpt")  # padded embedding rows
    with pytest.raises(ConfigError, match=r"model.path='ckpt': its tokenizer has 50000 tokens, the model's embedding only 49152"):
        check_vocab(50000, 49152, "ckpt")


def test_an_earlier_run_is_not_overwritten_without_asking(tmp_path):
    from sidpt.startup import check_run_dir

    check_run_dir(tmp_path / "new", overwrite=False)  # nothing there yet
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"holds an earlier run \(metrics.jsonl\).*--run.overwrite=true"):
        check_run_dir(tmp_path / "old", overwrite=False)
    check_run_dir(tmp_path / "old", overwrite=True)
