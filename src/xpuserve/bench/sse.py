"""Server-sent event lines. An SSE line ends at CR, LF or CRLF only; httpx's aiter_lines() also
splits at U+2028, U+2029, U+0085 and \\x1c-\\x1e, which servers may write raw inside their JSON."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

LINE_END = re.compile(rb"\r\n|\r|\n")


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    rest = b""
    async for chunk in chunks:
        lines, rest = _split(rest + chunk)
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if rest:
        yield rest.removesuffix(b"\r").decode("utf-8", errors="replace")


def _split(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines in `buffer`, and what follows them. A CR at the very end stays in the rest:
    the next chunk may start with the LF of a CRLF. (UTF-8 never has CR or LF bytes inside a character.)"""
    lines, start = [], 0
    for end in LINE_END.finditer(buffer):
        if end.group() == b"\r" and end.end() == len(buffer):
            break
        lines.append(buffer[start:end.start()])
        start = end.end()
    return lines, buffer[start:]
