"""Text <-> token ids over a checkpoint's `tokenizer.json`, matching transformers' AutoTokenizer."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import Template, TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

# The named special tokens transformers hands to chat templates as variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
MAX_RENDERED_CHARS = 32 << 20  # a template that multiplies its input (a loop in a loop) stops here


class ChatTemplateError(ValueError):
    """A chat template is missing, invalid, failed to render, or was refused by the sandbox."""


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens either as strings or as {"content": ...} dicts."""
    return value.get("content") if isinstance(value, dict) else value


def _config_template(value: Any) -> str | None:
    """tokenizer_config.json holds one template, or a list of named ones of which "default" is used."""
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value}.get("default")
    return value


class Tokenizer:
    def __init__(self, backend: _Backend, config: dict[str, Any], chat_template: str | None = None):
        self.backend = backend
        self.special_tokens = {n: t for n in SPECIAL_TOKEN_NAMES if (t := _token_text(config.get(n))) is not None}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        # Informational only. transformers 5 ignores these flags whenever tokenizer.json exists:
        # tokenizer.json's post-processor alone decides which special tokens encode() adds.
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.chat_template = chat_template or _config_template(config.get("chat_template"))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Tokenizer":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a model folder needs a Hugging Face tokenizer.json")
        config_path = Path(model_dir) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        # Like transformers, a chat_template.jinja file wins over the config's template.
        jinja_path = Path(model_dir) / "chat_template.jinja"
        template = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else None
        return cls(_Backend.from_file(str(path)), config, template)

    @property
    def bos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() for each text; unlike encode() it releases the GIL, so other threads run meanwhile."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # transformers 5 skips clean_up_tokenization_spaces for BPE models, so a plain decode matches it.
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text, as transformers' apply_chat_template(..., tokenize=False).

        Templates are untrusted code: they run in jinja2's immutable sandbox, and one that reaches for
        Python internals raises ChatTemplateError instead of running. Extra kwargs (tools, enable_thinking, ...)
        become template variables.
        """
        source = chat_template if chat_template is not None else self.chat_template
        if source is None:
            raise ChatTemplateError(
                "this tokenizer has no chat template: add `chat_template` to tokenizer_config.json, "
                "put a chat_template.jinja in the model folder, or pass chat_template="
            )
        # Keys whose value is None are dropped (templates handle a missing key better), but not
        # `content`: an assistant turn that only calls tools has content None, and templates such as
        # R1's test `message['content'] is none` for it, as transformers passes it.
        messages = [{k: v for k, v in _plain(m).items() if v is not None or k == "content"} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens, **_plain(kwargs)}
        return render_chat_template(source, messages=messages, add_generation_prompt=add_generation_prompt, **variables)


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        # jinja2 returns an Undefined that only fails when used further; refuse the access itself instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # transformers' filter: unlike jinja2's own, it does not HTML-escape and keeps non-ASCII text as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)


@lru_cache(maxsize=32)
def _compile(source: str) -> Template:
    return _ENV.from_string(source)


def _render(template: Template, variables: dict[str, Any]) -> str:
    parts, size = [], 0
    for part in template.generate(**variables):
        parts.append(part)
        size += len(part)
        if size > MAX_RENDERED_CHARS:
            raise ChatTemplateError(f"chat template output exceeds {MAX_RENDERED_CHARS} characters")
    return "".join(parts)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from JSON types, so no object with methods of its own reaches the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise ChatTemplateError(f"chat template inputs must be JSON data, got a {type(value).__name__}")


def render_chat_template(source: str, /, **variables: Any) -> str:
    try:
        return _render(_compile(source), variables)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template refused: it tried to reach Python internals ({e})") from e
    except TemplateError as e:  # syntax errors, undefined values, raise_exception(...)
        raise ChatTemplateError(f"chat template failed: {e}") from e
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e
