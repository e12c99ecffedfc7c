"""xpuserve's Tokenizer against transformers' AutoTokenizer on a real checkpoint's tokenizer."""

import json

import pytest

from xpuserve.tokenizer import Tokenizer

from oracle import STORIES
if not STORIES.is_dir():
    pytest.skip(f"{STORIES} is absent (shared test model)", allow_module_level=True)

TEXTS = [
    "",
    "Once upon a time",
    " leading space",
    "  two leading spaces",
    "line one\nline two\n\nafter a blank line\n",
    "unicode: héllo wörld, 世界, emoji 🙂",
    "Lily said, \"Let's play!\" and ran.",
    "<s>literal special tokens</s>",
    "\ttabs\tand trailing spaces   ",
]


@pytest.fixture(scope="module")
def tokenizers():
    transformers = pytest.importorskip("transformers")
    return Tokenizer.from_pretrained(STORIES), transformers.AutoTokenizer.from_pretrained(STORIES)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizers, text):
    ours, ref = tokenizers
    ids = ref(text)["input_ids"]
    assert ours.encode(text) == ids
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_bos_added_once_and_special_ids(tokenizers):
    ours, ref = tokenizers
    assert ours.add_bos_token
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.eos_token_id == ref.eos_token_id == 2
    ids = ours.encode("hi")
    assert ids[0] == 1 and ids[1] != 1


@pytest.mark.parametrize("post_processor", ["keep", "drop"])
def test_post_processor_decides_special_tokens(tokenizers, tmp_path, post_processor):
    """transformers 5 ignores add_bos_token once tokenizer.json exists: no post-processor, no BOS."""
    transformers = pytest.importorskip("transformers")
    spec = json.loads((STORIES / "tokenizer.json").read_text())
    if post_processor == "drop":
        spec["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text((STORIES / "tokenizer_config.json").read_text())
    ours, ref = Tokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.add_bos_token
    for text in ["", "Once upon a time"]:
        assert ours.encode(text) == ref(text)["input_ids"]
    assert (ours.encode("hi")[0] == 1) == (post_processor == "keep")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
