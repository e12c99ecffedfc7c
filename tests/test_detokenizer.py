"""Streaming detokenization and stop strings on a real byte-fallback tokenizer (stories260K)."""

import random

import pytest

from xpuserve.detokenizer import IncrementalDetokenizer, StopChecker, StopMatch
from xpuserve.tokenizer import Tokenizer

from oracle import STORIES
if not STORIES.is_dir():
    pytest.skip(f"{STORIES} is absent (shared test model)", allow_module_level=True)

TEXTS = [
    "Once upon a time",
    " leading space",
    "  two leading spaces",
    "line one\nline two\n\nafter a blank line\n",
    "héllo wörld, naïve café, Ærøskøbing",
    "世界你好，这是中文。",
    "emoji 🙂🙂 and 👍🏽 and 𝄞 clef",
    "mixed: a🙂b 世 é\n🙂",
    "🙂",
    "\n",
]
PROMPTS = ["", "Once upon a time", "Hi 世界", "ab🙂", "ends with a space ", "x\n"]
POOL = list("ab .,") + [" ", "  ", "\n", "é", "ü", "ß", "世", "界", "한", "🙂", "👍🏽", "𝄞"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(STORIES)


def _prompt_ids(tok, text):
    return tok.encode(text) if text else []


def _expected(tok, prompt, output, skip):
    """What the output adds to the prompt's text: the semantics the deltas must reproduce."""
    before, after = tok.decode(prompt, skip), tok.decode(prompt + output, skip)
    assert after.startswith(before)
    return after[len(before) :]


def _stream(tok, prompt, output, skip=True, chunks=None):
    detok = IncrementalDetokenizer(tok, prompt, skip)
    sizes = chunks or [1] * len(output)
    deltas, i = [], 0
    for n in sizes:
        deltas.append(detok.add(output[i : i + n]))
        i += n
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(tok, text, prompt, skip):
    p = _prompt_ids(tok, prompt)
    out = tok.encode(text, add_special_tokens=False)
    # The sentencepiece "▁" opening a word; without it the output continues the prompt's last word or character.
    variants = [out, out[1:] if tok.backend.id_to_token(out[0]) == "▁" else out, out + [tok.eos_token_id] + out]
    for output in variants:
        full = _expected(tok, p, output, skip)
        deltas = _stream(tok, p, output, skip)
        assert "".join(deltas) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), deltas


def test_multibyte_characters_are_held_back_then_released_whole(tok):
    out = tok.encode("🙂", add_special_tokens=False)[1:]  # four byte tokens
    assert [tok.backend.id_to_token(i)[:3] for i in out] == ["<0x"] * 4
    deltas = _stream(tok, tok.encode("Hi 世界"), out)  # the prompt's tail window would open inside 世
    assert deltas == ["", "", "", "🙂", ""]


def test_finish_releases_an_incomplete_character(tok):
    out = tok.encode("a🙂", add_special_tokens=False)[:-1]  # last byte missing
    detok = IncrementalDetokenizer(tok, [tok.bos_token_id])
    streamed = "".join(detok.add([i]) for i in out)
    assert "\ufffd" not in streamed
    assert streamed + detok.finish() == tok.decode([tok.bos_token_id] + out)


def test_random_texts_and_chunkings(tok):
    rng = random.Random(1234)
    for _ in range(400):
        prompt = _prompt_ids(tok, "".join(rng.choice(POOL) for _ in range(rng.randint(0, 6))))
        out = tok.encode("".join(rng.choice(POOL) for _ in range(rng.randint(1, 12))), add_special_tokens=False)
        if rng.random() < 0.3 and tok.backend.id_to_token(out[0]) == "▁" and len(out) > 1:
            out = out[1:]
        chunks, left = [], len(out)
        while left:
            chunks.append(min(left, rng.randint(1, 4)))
            left -= chunks[-1]
        skip = rng.random() < 0.5
        full = _expected(tok, prompt, out, skip)
        deltas = _stream(tok, prompt, out, skip, chunks)
        assert "".join(deltas) == full, (prompt, out, chunks)
        assert "\ufffd" not in "".join(deltas[:-1])


def test_decodes_only_a_small_window(tok, monkeypatch):
    """O(1) per token: each decode sees a bounded window however long the output grows."""
    prompt = tok.encode("Once upon a time 世界")
    out = tok.encode(" there was a girl 🙂 named 世界 who liked é and ü.\n" * 40, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    sizes, real = [], tok.decode

    def counting_decode(ids, skip_special_tokens=True):
        sizes.append(len(ids))
        return real(ids, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", counting_decode)
    text = "".join(detok.add([i]) for i in out) + detok.finish()
    monkeypatch.undo()
    assert text == _expected(tok, prompt, out, True)
    assert len(out) > 800 and max(sizes) <= 16
    assert len(detok.ids) <= 16


# --- stop strings --------------------------------------------------------------------------------------------


def _stream_with_stops(tok, text, stops, prompt="Once upon a time"):
    """A streamer: sends only what no stop string can take back; returns (sent pieces, final text, match)."""
    detok, checker = IncrementalDetokenizer(tok, tok.encode(prompt)), StopChecker(stops)
    sent = []
    for token in tok.encode(text, add_special_tokens=False):
        delta = detok.add([token])
        match = checker.find(detok.text, len(delta))
        if match is not None:
            detok.truncate(match.index)
            sent.append(detok.text[len("".join(sent)) :])
            return sent, detok.text, match
        safe = len(detok.text) - checker.hold_back(detok.text)
        sent.append(detok.text[len("".join(sent)) : safe])
    sent.append(detok.text[len("".join(sent)) :] + detok.finish())
    return sent, "".join(sent), None


def test_stop_string_spanning_tokens_is_cut_exactly(tok):
    text = " she said hello</think> and then more text"
    stop = "</think>"
    assert len(tok.encode(stop, add_special_tokens=False)) > 3  # the stop string spans several tokens
    sent, final, match = _stream_with_stops(tok, text, [stop, "never"])
    assert match == StopMatch(text.index(stop), stop)
    assert final == "".join(sent) == " she said hello"
    # Hold-back: "</thi" etc. was never sent, so nothing had to be taken back.
    assert all("<" not in piece for piece in sent)


def test_stop_string_made_of_multibyte_characters(tok):
    text = " we saw 世 and then 世界🙂 again"
    sent, final, match = _stream_with_stops(tok, text, ["界🙂"])
    assert final == "".join(sent) == " we saw 世 and then 世"
    assert match.stop == "界🙂"


def test_held_back_text_is_released_without_a_stop(tok):
    text = " she wrote </thi and stopped"
    sent, final, match = _stream_with_stops(tok, text, ["</think>"])
    assert match is None and final == text


def test_hold_back():
    checker = StopChecker(["</think>", "STOP", ""])
    assert checker.hold_back("abc</thi") == 5
    assert checker.hold_back("abc<") == 1
    assert checker.hold_back("abc</think") == 7
    assert checker.hold_back("abc") == 0
    assert checker.hold_back("") == 0
    assert checker.hold_back("xST") == 2
    assert checker.hold_back("</think>") == 0  # a whole stop string is find()'s business
    assert StopChecker([]).hold_back("anything") == 0


def test_find_earliest_ending_match_whatever_the_chunking():
    checker = StopChecker(["abcd", "bc", "zz"])
    text = "xx abcd zz"
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 5))) + [len(text)]
        found, start = None, 0
        for end in cuts:
            found = checker.find(text[:end], end - start)
            if found:
                break
            start = end
        assert found == StopMatch(4, "bc")  # "bc" completes before "abcd" does


def test_find_only_looks_at_stops_ending_in_new_text():
    checker = StopChecker(["ab"])
    assert checker.find("ab", 2) == StopMatch(0, "ab")
    assert checker.find("ab", 1) == StopMatch(0, "ab")  # split across two deltas
    assert checker.find("abxx", 2) is None  # already complete before the new text
    assert checker.find("abxab", 1) == StopMatch(3, "ab")
    assert checker.find("abc", 0) is None
    tie = StopChecker(["b", "ab"])
    assert tie.find("xab", 3) == StopMatch(1, "ab")  # same end: the longer one cuts earlier
