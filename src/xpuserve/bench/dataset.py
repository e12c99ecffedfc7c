"""Prompts for a benchmark: random token ids (exact input length), random words, or a JSONL file."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer

# Token ids drawn when no tokenizer folder is given: below 256 every vocabulary of the R1 family
# (and any byte-level tokenizer, the test and demo models too) has them; 0-2 are BOS/EOS/PAD in
# DeepSeek's and Llama's tokenizers, so they are left out.
DEFAULT_TOKEN_IDS = (3, 256)
FIRST_TOKEN_ID = 3
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or "
    "had not but have one all their new after who they first its has been two more also other into "
    "time when would there about over than most river city world house water light field story "
    "number music system people under place while small between within around during"
).split()


def token_id_range(tokenizer_dir: str | None) -> tuple[int, int]:
    """[low, high) of the ids to draw: up to the vocabulary of `tokenizer_dir`, else DEFAULT_TOKEN_IDS."""
    if tokenizer_dir is None:
        return DEFAULT_TOKEN_IDS
    folder = Path(tokenizer_dir)
    config = folder / "config.json"
    # The tokenizer's own size first: a checkpoint's vocab_size is often padded (R1: 129,280 rows for
    # ~128.8k tokens), and servers may refuse ids that no token has.
    if (folder / "tokenizer.json").is_file():
        vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    elif config.is_file():
        vocab = json.loads(config.read_text()).get("vocab_size")
    else:
        raise FileNotFoundError(f"--tokenizer {tokenizer_dir}: no config.json or tokenizer.json there")
    if not isinstance(vocab, int) or vocab <= FIRST_TOKEN_ID:
        raise ValueError(f"--tokenizer {tokenizer_dir}: no usable vocab_size ({vocab!r})")
    return FIRST_TOKEN_ID, vocab


def random_token_prompts(n: int, length: int, ids: tuple[int, int], seed: int) -> list[list[int]]:
    """`n` prompts of exactly `length` token ids, for /v1/completions (no tokenizer needed)."""
    rng = random.Random(seed)
    return [[rng.randrange(*ids) for _ in range(length)] for _ in range(n)]


def random_text_prompts(n: int, words: int, seed: int) -> list[str]:
    """`n` prompts of `words` random words, for chat; the server's usage tells their token counts."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def load_jsonl(path: str, n: int | None) -> list[str]:
    """The "prompt" of each line of `path`; `n` of them, repeating the file if it has fewer (all when None)."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\"") from None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{number}: \"prompt\" must be a non-empty string")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts if n is None else [prompts[i % len(prompts)] for i in range(n)]
