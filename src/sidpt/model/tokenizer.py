"""Tokenizer and chat template from an HF checkpoint directory, without transformers.

``tokenizer.json`` is run by the ``tokenizers`` library (the same Rust code transformers' fast
tokenizers use). The chat template comes from ``chat_template.jinja`` (transformers 5) or the
``chat_template`` field of ``tokenizer_config.json`` (a string, or a list of named templates) and
is rendered the way transformers renders it: a sandboxed jinja2 environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
does not escape HTML or non-ASCII, ``raise_exception`` and ``strftime_now``, and the named special
tokens (``bos_token``, ``eos_token``, ...) as template variables.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed; the message names the file."""


def _token_str(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as serialized AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise TokenizerError(f"special token {value!r}: expected a string or {{'content': ...}}")


class _GenerationBlocks(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers in some templates) render
    their body unchanged, as transformers does when it is not tracking assistant tokens."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationBlocks])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """transformers passes a message's reasoning as ``reasoning_content`` and ``thinking`` whichever
    of (reasoning_content, thinking, reasoning) the caller used; templates read either."""
    for key in ("reasoning_content", "thinking", "reasoning"):
        if message.get(key) is not None:
            return {"thinking": message[key], **message, "reasoning_content": message[key]}
    return message


class Tokenizer:
    """Encode/decode text and render chat templates for one checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        path = self.path = Path(path)
        file = path / "tokenizer.json"
        try:
            self.tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"{file}: cannot load ({e})") from None
        config: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                config = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg_file}: invalid JSON: {e}") from None
        legacy = path / "special_tokens_map.json"  # older checkpoints keep special tokens here
        if legacy.exists():
            for k, v in json.loads(legacy.read_text()).items():
                config.setdefault(k, v)
        self.special_tokens = {
            name: _token_str(config.get(name)) for name in SPECIAL_TOKEN_NAMES if config.get(name) is not None
        }
        self.chat_template = self._find_template(path, config)
        self.add_bos = bool(config.get("add_bos_token", False))

    @staticmethod
    def _find_template(path: Path, config: dict) -> str | None:
        jinja_file = path / "chat_template.jinja"
        if jinja_file.exists():
            return jinja_file.read_text()
        tpl = config.get("chat_template")
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t["name"]: t["template"] for t in tpl}
            return named.get("default", next(iter(named.values()), None))
        return tpl

    # -- ids ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("bos_token"))

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("eos_token"))

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("pad_token"))

    # -- text ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. ``add_special_tokens`` applies tokenizer.json's post-processor (e.g. BOS)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` to text exactly as transformers' ``apply_chat_template(tokenize=False)``."""
        source = chat_template or self.chat_template
        if source is None:
            raise TokenizerError("this tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
        context = {**self.special_tokens, **kwargs}
        messages = [_alias_reasoning(m) for m in messages]
        return compile_chat_template(source).render(
            messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            **context,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **kwargs) -> list[int]:
        """Rendered chat -> ids (special tokens come from the template, none are added)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))
