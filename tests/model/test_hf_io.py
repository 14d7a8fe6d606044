"""Checkpoint I/O: sidpt-saved checkpoints load in transformers, sharded files load, bad files fail clearly."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sidpt.model import CheckpointError, build_model, load_checkpoint, save_checkpoint
from sidpt.model.model import ModelArgs
from tests.model.hf_fixtures import hf_config, make_hf_model, masked_max_abs, ragged_batch

LENGTHS = [17, 5, 11]


def _logits_equal_hf(ours, path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens, mask = ragged_batch(ours.args.vocab_size, LENGTHS, seed=4)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask).logits
        out = ours(tokens)
    assert ref.abs().max() > 0.1
    return masked_max_abs(out, ref, mask)


@pytest.mark.parametrize(
    "args",
    [
        ModelArgs(family="llama", vocab_size=80, tie_embeddings=True),
        ModelArgs(family="qwen2", vocab_size=80, qkv_bias=True, n_kv_heads=4),
        ModelArgs(family="qwen3", vocab_size=80, qk_norm=True, head_dim=24,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8)),
    ],
    ids=["llama-tied", "qwen2-mha", "qwen3-llama3rope"],
)
def test_sidpt_saved_checkpoint_loads_in_transformers(args, tmp_path):
    ours = build_model(args, seed=5)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ckpt", ours)
    assert _logits_equal_hf(ours, tmp_path / "ckpt") <= 1e-5
    # and back into sidpt, bitwise
    again = load_checkpoint(tmp_path / "ckpt")
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_sharded_save_and_load_both_ways(tmp_path):
    ours = build_model(ModelArgs(family="qwen3", qk_norm=True, vocab_size=64), seed=6)
    save_checkpoint(tmp_path / "s", ours, max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "s" / "model.safetensors").exists()
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert _logits_equal_hf(load_checkpoint(tmp_path / "s"), tmp_path / "s") <= 1e-5

    # a checkpoint sharded by transformers' own save_pretrained
    hf = make_hf_model(hf_config("qwen2", tied=False))
    hf.save_pretrained(tmp_path / "h", max_shard_size="30KB")
    assert len(list((tmp_path / "h").glob("*.safetensors"))) >= 2
    loaded = load_checkpoint(tmp_path / "h")
    tokens, mask = ragged_batch(loaded.args.vocab_size, LENGTHS, seed=7)
    with torch.no_grad():
        assert masked_max_abs(loaded(tokens), hf(input_ids=tokens, attention_mask=mask).logits, mask) <= 1e-5


def test_save_is_atomic(tmp_path):
    """A save that fails half-way leaves the previous checkpoint intact and no temporary files."""
    ours = build_model(ModelArgs(), seed=1)
    save_checkpoint(tmp_path / "c", ours)
    before = load_file(tmp_path / "c" / "model.safetensors")
    other = build_model(ModelArgs(), seed=2)
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path / "c", other, extra_files={"tokenizer.json": tmp_path / "missing.json"})
    after = load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    save_checkpoint(tmp_path / "c", other)  # overwrite succeeds and replaces
    assert torch.equal(load_checkpoint(tmp_path / "c").embed_tokens.weight, other.embed_tokens.weight)


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: each error names the file and, where there is one, the tensor.


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, build_model(ModelArgs(vocab_size=64), seed=3))
    return path


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_checkpoint(ckpt)


def test_corrupted_safetensors_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage in the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_checkpoint(ckpt)


def test_nonfinite_weight_names_tensor(ckpt):
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' holds NaN"):
        load_checkpoint(ckpt)


def test_config_missing_required_field(ckpt):
    f = ckpt / "config.json"
    cfg = json.loads(f.read_text())
    del cfg["num_hidden_layers"]
    f.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: missing required field 'num_hidden_layers'"):
        load_checkpoint(ckpt)


def test_config_unsupported_family(ckpt):
    f = ckpt / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type='gpt2' is not supported"):
        load_checkpoint(ckpt)


def test_shape_mismatch_names_file_and_tensor(ckpt):
    f = ckpt / "config.json"
    cfg = json.loads(f.read_text())
    cfg["intermediate_size"] += 8
    f.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    msg = str(e.value)
    assert "model.safetensors" in msg and "model.layers.0.mlp." in msg
    assert "(192, 64)" in msg or "(64, 192)" in msg  # the stored shape
    assert "(200, 64)" in msg or "(64, 200)" in msg  # the shape config.json implies


def test_missing_and_unexpected_tensors(ckpt):
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.norm.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"missing tensors \['model\.norm\.weight'\]"):
        load_checkpoint(ckpt)
    tensors["model.norm.weight"] = torch.ones(64)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.ones(3)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_checkpoint(ckpt)


def test_missing_shard_names_shard(tmp_path):
    save_checkpoint(tmp_path / "s", build_model(ModelArgs(), seed=0), max_shard_bytes=20_000)
    shard = sorted((tmp_path / "s").glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: shard listed in model\.safetensors\.index\.json not found"):
        load_checkpoint(tmp_path / "s")


def test_missing_directory_contents(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load_checkpoint(tmp_path)
