"""Hugging Face checkpoint I/O without transformers: ``config.json`` + ``*.safetensors``.

Reads single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``)
checkpoints of the Llama, Qwen2 and Qwen3 families and writes the same layout back, so a
checkpoint saved by sidpt loads in transformers and vLLM. sidpt's names are HF's minus the
``model.`` prefix, with q/k/v stacked into ``qkv_proj`` and gate/up into ``gate_up_proj``
(``hf_to_sidpt`` / ``sidpt_to_hf``). Every failure names the file and, where there is one, the
tensor: a corrupt or truncated safetensors file, a config.json missing a field, a tensor whose
shape disagrees with the config, a missing or unexpected tensor, a non-finite weight.

Writes are atomic: files go to a temporary sibling directory that is renamed into place, so an
interrupted save never leaves a half-written checkpoint under the target name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sidpt.files import umask_mode
from sidpt.model.model import DTYPES, ModelArgs, Transformer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PREFIX = "model."  # HF's prefix on every parameter but lm_head

# Tensors that old checkpoints carry and that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint is unreadable or disagrees with its config; the message names the file."""


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelArgs


def args_from_hf_config(cfg: dict, source: str = CONFIG_FILE) -> ModelArgs:
    """Map an HF config dict (transformers 4 or 5 layout) to ``ModelArgs``."""

    def need(key: str):
        if key not in cfg:
            raise CheckpointError(f"{source}: missing required field {key!r}")
        return cfg[key]

    family = need("model_type")
    if family not in ("llama", "qwen2", "qwen3"):
        raise CheckpointError(f"{source}: model_type={family!r} is not supported (llama, qwen2, qwen3)")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    if cfg.get("use_sliding_window") and family != "llama":
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act={act!r} is not supported (silu)")

    # RoPE: transformers 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
    rope = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = cfg.get("rope_theta", 10000.0)
    legacy = cfg.get("rope_scaling") or {}
    for k, v in legacy.items():
        rope.setdefault(k, v)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = float(rope.pop("rope_theta"))
    scaling = {}
    if rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(rope["factor"])}
    elif rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in rope]
        if missing:
            raise CheckpointError(f"{source}: llama3 rope scaling is missing {missing}")
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
    elif rope_type != "default":
        raise CheckpointError(f"{source}: rope_type={rope_type!r} is not supported (default, linear, llama3)")

    n_heads = need("num_attention_heads")
    dim = need("hidden_size")
    attention_bias = bool(cfg.get("attention_bias", False))
    try:
        return ModelArgs(
            vocab_size=need("vocab_size"),
            dim=dim,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or dim // n_heads,
            intermediate_size=need("intermediate_size"),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=family == "qwen2" or (family == "llama" and attention_bias),
            o_bias=family == "llama" and attention_bias,
            qk_norm=family == "qwen3",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            family=family,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json that transformers (4 and 5) and vLLM read for ``args``."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    rope = {"rope_theta": args.rope_theta, "rope_type": args.rope_scaling.get("rope_type", "default")}
    rope.update({k: v for k, v in args.rope_scaling.items() if k != "rope_type"})
    cfg = {
        "architectures": [arch[args.family]],
        "model_type": args.family,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "rope_parameters": rope,
        # transformers 4 and older vLLM read these two; transformers 5 folds them into rope_parameters.
        "rope_theta": args.rope_theta,
        "rope_scaling": dict(args.rope_scaling) or None,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if args.family == "llama":
        cfg["attention_bias"] = args.o_bias
        cfg["mlp_bias"] = False
    if args.family == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def read_args(path: str | os.PathLike) -> ModelArgs:
    """ModelArgs from ``<path>/config.json``."""
    file = Path(path) / CONFIG_FILE
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (an HF checkpoint directory needs config.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON: {e}") from None
    return args_from_hf_config(cfg, str(file))


# ---------------------------------------------------------------------------------------------
# Weights


def hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a checkpoint of ``args`` must hold."""
    d, hd, inter = args.dim, args.head_dim, args.intermediate_size
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (args.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(args.n_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        shapes.update({a + "q_proj.weight": (q, d), a + "k_proj.weight": (kv, d), a + "v_proj.weight": (kv, d),
                       a + "o_proj.weight": (d, q)})
        if args.qkv_bias:
            shapes.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
        if args.o_bias:
            shapes[a + "o_proj.bias"] = (d,)
        if args.qk_norm:
            shapes.update({a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
        shapes.update({m + "gate_proj.weight": (inter, d), m + "up_proj.weight": (inter, d),
                       m + "down_proj.weight": (d, inter)})
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (d,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (d,)
    if not args.tie_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, d)
    return shapes


# sidpt fuses q/k/v into qkv_proj and gate/up into gate_up_proj (rows stacked in this order).
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def hf_to_sidpt(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF-named tensors -> sidpt state dict (drops the ``model.`` prefix, stacks fused projections)."""
    out = {}
    for name, t in tensors.items():
        if not any(f".{part}." in name for parts in _FUSED.values() for part in parts):
            out[name.removeprefix(PREFIX)] = t
    for i in range(args.n_layers):
        base = f"model.layers.{i}."
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{base}{p}.{kind}" for p in parts]
                if names[0] in tensors:
                    out[f"layers.{i}.{fused}.{kind}"] = torch.cat([tensors[n] for n in names], dim=0)
    return out


def sidpt_to_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """sidpt state dict -> HF-named tensors (splits the fused projections)."""
    q, kv, inter = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    sizes = {"self_attn.qkv_proj": (q, kv, kv), "mlp.gate_up_proj": (inter, inter)}
    out = {}
    for name, t in state_dict.items():
        fused = next((f for f in _FUSED if f".{f}." in name), None)
        if fused is None:
            out[name if name.startswith("lm_head.") else PREFIX + name] = t
            continue
        layer, kind = name.split(f".{fused}.")
        for part, piece in zip(_FUSED[fused], t.split(sizes[fused], dim=0)):
            out[f"{PREFIX}{layer}.{part}.{kind}"] = piece
    return out


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the file that holds it."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index ({type(e).__name__}: {e})") from None
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{single}: not a readable safetensors file ({e})") from None


def load_state_dict(path: str | os.PathLike, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Read, check and return the sidpt state dict (dtype as stored) for ``args``."""
    path = Path(path)
    want = hf_shapes(args)
    files = _weight_files(path)
    by_file: dict[Path, list[str]] = {}
    for hf_name, file in files.items():
        by_file.setdefault(file, []).append(hf_name)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if name == "lm_head.weight" and args.tie_embeddings:
                        continue  # tied: the head reads the embedding
                    if name not in want:
                        raise CheckpointError(f"{file}: unexpected tensor {name!r} for this config")
                    if name not in present:
                        raise CheckpointError(f"{file}: index lists {name!r} but the file lacks it")
                    t = f.get_tensor(name)
                    if tuple(t.shape) != want[name]:
                        raise CheckpointError(
                            f"{file}: tensor {name!r} has shape {tuple(t.shape)}, "
                            f"but config.json implies {want[name]}"
                        )
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise CheckpointError(f"{file}: tensor {name!r} holds NaN or inf values")
                    out[name] = t
        except FileNotFoundError:
            raise CheckpointError(f"{file}: shard listed in {INDEX_FILE} not found") from None
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    missing = [n for n in want if n not in out]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return hf_to_sidpt(out, args)


def load_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Build a ``Transformer`` from an HF checkpoint directory."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    args = read_args(path)
    sd = load_state_dict(path, args)
    with torch.device("meta"):
        model = Transformer(args)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True, strict=True)
    return model


def save_checkpoint(
    path: str | os.PathLike,
    model_or_args: Transformer | ModelArgs,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> None:
    """Write ``config.json`` and safetensors (sharded above ``max_shard_bytes``) atomically.

    Pass a model, or ``ModelArgs`` plus a full (gathered, non-DTensor) sidpt-named state dict.
    ``extra_files`` (name -> source path) are copied alongside, e.g. tokenizer files."""
    if isinstance(model_or_args, Transformer):
        args, state_dict = model_or_args.args, state_dict or model_or_args.state_dict()
    else:
        args = model_or_args
        if state_dict is None:
            raise ValueError("save_checkpoint(path, args, ...) needs a state_dict")
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
               for k, v in sidpt_to_hf(state_dict, args).items()}
    dtype = dtype or next(iter(tensors.values())).dtype

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask_mode(tmp)
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_from_args(args, dtype), indent=2) + "\n")
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata=meta)
                weight_map.update({name: file for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``; an existing ``dst`` is swapped out, then removed."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)
