"""Text <-> token ids over a checkpoint's `tokenizer.json`, matching transformers' AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens either as strings or as {"content": ...} dicts."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, backend: _Backend, config: dict[str, Any]):
        self.backend = backend
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        # Informational only. transformers 5 ignores these flags whenever tokenizer.json exists:
        # tokenizer.json's post-processor alone decides which special tokens encode() adds.
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Tokenizer":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a model folder needs a Hugging Face tokenizer.json")
        config_path = Path(model_dir) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(_Backend.from_file(str(path)), config)

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

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # transformers 5 skips clean_up_tokenization_spaces for BPE models, so a plain decode matches it.
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
