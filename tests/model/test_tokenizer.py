"""Tokenizer and chat template parity with transformers, on tokenizers built in the test."""

import json

import pytest
import transformers
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from sidpt.model import Tokenizer, TokenizerError
from tests.model.chat_templates import LLAMA3, QWEN

CORPUS = [
    "Search agents retrieve documents and reason over them before they answer.",
    "def f(x):\n    return x ** 2  # squares\n\tindented = True",
    "Zürich, 東京, Москва, São Paulo — naïve café façade; emoji 🚀🔍 and math ∑ᵢ xᵢ² ≤ ∞.",
    "   leading spaces, trailing spaces   \n\n\n multiple\r\nline endings",
    "<search>capital of France</search><information>Paris is the capital.</information>",
] * 20

SAMPLES = [
    "Hello world!",
    "def g(y):\n    return [i for i in range(y)]  \n",
    "Zürich → 東京 (Tōkyō) 🚀 ∑ naïve",
    "    \t  whitespace   runs\n\n\n\n   ",
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nhi<|eot_id|>",
    "unseen words: xylophone quixotic 0x1F 3.14159e-10",
    "",
]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


def build_tokenizer(path, template: str, style: str, in_config: bool = False):
    """A byte-level BPE tokenizer trained here, saved by transformers with a chat template."""
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if style == "llama":  # Llama 3 prepends BOS through the post-processor
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
        specials = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    else:
        specials = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **specials)
    fast.save_pretrained(path)
    if in_config:  # transformers 4 layout: template inside tokenizer_config.json, as a named list
        jinja = path / "chat_template.jinja"
        if jinja.exists():
            jinja.unlink()
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg["chat_template"] = [{"name": "default", "template": template}, {"name": "rag", "template": "x"}]
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_encode_decode_match_transformers(style, tmp_path):
    hf = build_tokenizer(tmp_path, QWEN if style == "qwen" else LLAMA3, style)
    ours = Tokenizer(tmp_path)
    assert ours.vocab_size == len(hf)
    assert ours.eos_id == hf.eos_token_id and ours.bos_id == hf.bos_token_id
    special_ids = {ours.token_id(t) for t in SPECIALS}
    assert None not in special_ids
    n_special = 0
    for text in SAMPLES:
        for add in (False, True):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf(text, add_special_tokens=add)["input_ids"], (text, add)
        ids = ours.encode(text)
        n_special += sum(i in special_ids for i in ids)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids) == text  # byte-level BPE round-trips
    assert n_special >= 6  # special tokens inside text are matched as single ids


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "  You answer with <answer>...</answer>.  "},
        {"role": "user", "content": "Who wrote Faust? Zürich 🚀"},
        {"role": "assistant", "content": "<search>Faust author</search>"},
        {"role": "user", "content": "<information>Goethe wrote Faust.</information>"},
        {"role": "assistant", "content": "<answer>Goethe</answer>"},
        {"role": "user", "content": "And\n\nwhen?"},
    ],
]

TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the corpus ü",
                                            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]

TOOL_CHAT = [
    {"role": "user", "content": "Find it"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "search", "arguments": {"query": "Faust <author> & \"date\""}}}]},
    {"role": "tool", "content": "Goethe, 1808"},
    {"role": "tool", "content": "second result"},
]


@pytest.mark.parametrize("in_config", [False, True], ids=["chat_template.jinja", "tokenizer_config"])
@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_chat_template_byte_identical(style, in_config, tmp_path):
    hf = build_tokenizer(tmp_path, QWEN if style == "qwen" else LLAMA3, style, in_config=in_config)
    ours = Tokenizer(tmp_path)
    cases = [(c, None) for c in CONVERSATIONS] + [(TOOL_CHAT, TOOLS)]
    rendered = set()
    for messages, tools in cases:
        for gen in (False, True):
            ref = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
            got = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=gen)
            assert got == ref
            ref_ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=True)
            ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
            assert ours.encode_chat(messages, add_generation_prompt=gen, tools=tools) == list(ref_ids)
            rendered.add(got)
    assert len(rendered) == 2 * len(cases)  # add_generation_prompt and each conversation change the text
    # template variables from kwargs override, as in transformers
    if style == "llama":
        text = ours.apply_chat_template(CONVERSATIONS[0], date_string="1 Jan 2030")
        assert text == hf.apply_chat_template(CONVERSATIONS[0], tokenize=False, date_string="1 Jan 2030")
        assert "Today Date: 1 Jan 2030" in text


def test_template_errors_are_raised(tmp_path):
    build_tokenizer(tmp_path, LLAMA3, "llama")
    with pytest.raises(Exception, match="unknown role narrator"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "narrator", "content": "x"}])


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot load"):
        Tokenizer(tmp_path)
    build_tokenizer(tmp_path, QWEN, "qwen")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: invalid JSON"):
        Tokenizer(tmp_path)


def test_generation_blocks_render_like_transformers(tmp_path):
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n"
                "{% endfor %}")
    hf = build_tokenizer(tmp_path, template, "qwen")
    chat = CONVERSATIONS[1][1:]
    ours = Tokenizer(tmp_path).apply_chat_template(chat)
    assert ours == hf.apply_chat_template(chat, tokenize=False)
    assert "<|im_start|>assistant\n<answer>Goethe</answer><|im_end|>" in ours
