"""Streaming output: token ids to text deltas that never need taking back, and stop strings."""

from __future__ import annotations

from dataclasses import dataclass

from xpuserve.tokenizer import Tokenizer

# Prompt tokens decoded ahead of the output, so the first output token keeps its leading space
# (a Llama decoder strips the space of whatever token opens the decoded text). vLLM uses 5 too.
CONTEXT_TOKENS = 5
# A UTF-8 character is at most 4 bytes, so at most 3 byte tokens separate a cut from the character's start.
MAX_CHAR_BYTES = 4
REPLACEMENT = "\ufffd"  # what the decoder yields for bytes of an incomplete character


class IncrementalDetokenizer:
    """Decodes one sequence's output as a continuation of its prompt, one small window at a time.

    `ids[prefix:read]` has been emitted already and `ids[read:]` is pending; a delta is the text the pending ids
    add to the window's decode. Ids before the window are dropped, so each step costs O(window), not O(output).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-(CONTEXT_TOKENS + MAX_CHAR_BYTES - 1) :])
        self.read = len(self.ids)
        self.prefix = self._char_start(max(0, self.read - CONTEXT_TOKENS))
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _char_start(self, start: int) -> int:
        # A window that opens inside a character decodes it as U+FFFD; with byte fallback the whole run of
        # byte tokens then does, including the output's bytes that continue it. Step back to the character's start.
        lowest = max(0, start - MAX_CHAR_BYTES + 1)
        while start > lowest and self._decode(self.ids[start : self.read]).startswith(REPLACEMENT):
            start -= 1
        return start

    def add(self, token_ids: list[int]) -> str:
        """Append output tokens; return the new text, holding back a character until all its bytes are in."""
        self.ids.extend(token_ids)
        return self._advance(final=False)

    def finish(self) -> str:
        """Release whatever is held back (an incomplete character decodes as U+FFFD) once the sequence ends."""
        return self._advance(final=True)

    def truncate(self, length: int) -> None:
        """Cut `text` to `length` characters, e.g. at a stop string; the sequence must not continue."""
        self.text = self.text[:length]

    def _advance(self, final: bool) -> str:
        emitted = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        # Nothing new (e.g. a skipped special token) keeps the window as is, so its text never starts empty.
        if len(window) <= len(emitted) or (window.endswith(REPLACEMENT) and not final):
            return ""
        delta = window[len(emitted) :]
        del self.ids[: self.read]
        self.prefix, self.read = 0, len(self.ids)
        self.text += delta
        return delta


@dataclass
class StopMatch:
    index: int  # where the text is cut: the stop string starts here and is not part of the output
    stop: str


class StopChecker:
    """Finds stop strings in growing text, and says how much of the text's end may still become one.

    A streamer sends `text[:len(text) - hold_back(text)]` at most, so it never sends what a stop string later cuts.
    When the sequence ends without a stop string, the held-back characters are sent too.
    """

    def __init__(self, stop: list[str]):
        self.stop = [s for s in dict.fromkeys(stop) if s]

    def find(self, text: str, new_chars: int) -> StopMatch | None:
        """The first stop string to complete within the last `new_chars` characters of `text`.

        "First" is the one that ends first (ties: the longer one), as if the text had arrived a character at a
        time, so the cut does not depend on how the text was split into deltas. Costs O(new_chars + stop length).
        """
        old = len(text) - new_chars
        best: StopMatch | None = None
        for stop in self.stop:
            start = text.find(stop, max(0, old - len(stop) + 1))
            if start < 0:
                continue
            if best is None or (start + len(stop), start) < (best.index + len(best.stop), best.index):
                best = StopMatch(start, stop)
        return best

    def hold_back(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper beginning of some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
