"""Prompt syntax: AUTOMATIC1111's attention weights and chunks beyond the text encoder's 77 tokens.

    (word)      weight x 1.1        ((word))   x 1.21         (word:1.3)   x 1.3 (the number replaces 1.1)
    [word]      weight / 1.1        \\( \\) \\[ \\]   literal brackets  BREAK        start a new 75-token chunk

Brackets nest and multiply; a bracket without its partner (or closing the other kind) is literal text, so no
prompt is an error. Prompts are split into chunks of 75 tokens (after the last comma within 20 tokens of the end,
as A1111 does), each encoded as BOS + 75 + EOS; the chunks' token embeddings are concatenated. `plain` turns the
syntax off (brackets are text, the prompt is cut at 77 tokens with a warning).
"""

from __future__ import annotations

import re

SYNTAXES = (A1111, PLAIN) = ("a1111", "plain")
BREAK = "BREAK"
UP = 1.1  # ( ) multiplies the weight by UP, [ ] divides by it
CHUNK = 75  # tokens of a chunk between its BOS and EOS
COMMA_BACKTRACK = 20  # a full chunk ends after its last comma if that is at most this many tokens back

TOKENS = re.compile(r"\\([()\[\]\\])|(\()|(\[)|(\))|(\])|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*(?=\))|(\bBREAK\b)|"
                    r"([^\\()\[\]:B]+|B|:|\\)")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A prompt -> (text, weight) segments, adjacent equal weights merged; BREAK is the segment (BREAK, -1)."""
    items: list[tuple[str, str | float]] = []  # (kind, value): text, open, close, weight, break
    for m in TOKENS.finditer(text):
        escaped, open_round, open_square, close_round, close_square, number, brk, plain = m.groups()
        if escaped or plain:
            items.append(("text", escaped or plain))
        elif open_round or open_square:
            items.append(("open", open_round or open_square))
        elif close_round or close_square:
            items.append(("close", close_round or close_square))
        elif number is not None:
            items.append(("weight", m.group(0)))
        else:
            items.append(("break", brk))
    partner, stack = {}, []  # matched brackets: open index <-> close index
    for i, (kind, value) in enumerate(items):
        if kind == "open":
            stack.append(i)
        elif kind == "close" and stack and items[stack[-1]][1] == {")": "(", "]": "["}[value]:
            j = stack.pop()
            partner[i], partner[j] = j, i
    out: list[tuple[str, float]] = []
    weights = [1.0]
    for i, (kind, value) in enumerate(items):
        if kind == "open" and i in partner:
            close = partner[i]
            before = items[close - 1]
            factor = (float(re.search(r"[+-]?(?:\d+\.?\d*|\.\d+)", before[1])[0]) if before[0] == "weight"
                      else UP) if value == "(" else 1 / UP
            weights.append(weights[-1] * factor)
        elif kind == "close" and i in partner:
            weights.pop()
        elif kind == "weight" and i + 1 in partner:
            continue
        elif kind == "break":
            out.append((BREAK, -1.0))
        else:
            add(out, value, weights[-1])
    return out or [("", 1.0)]


def add(out: list[tuple[str, float]], text: str, weight: float) -> None:
    """Append a segment, merged into the previous one if it has the same weight."""
    if out and out[-1][1] == weight:
        out[-1] = (out[-1][0] + text, weight)
    else:
        out.append((text, weight))


def chunks(tokens: list[tuple[int, float]], comma: int | None, size: int = CHUNK,
           spans: dict[int, int] | None = None) -> list[list[tuple[int, float]]]:
    """(token id, weight) pairs -> chunks of at most `size`, BREAK (id -1) forcing a new one, and a full chunk
    ending after its last `comma` token when that is at most COMMA_BACKTRACK tokens back (A1111's rule: the
    tokens after the comma move to the next chunk); a trailing empty chunk is dropped unless it is the only one.
    `spans`: ids that start a run of that many tokens kept in one chunk (a textual-inversion embedding's vectors,
    moved whole to the next chunk when they do not fit, as A1111 does)."""
    out: list[list[tuple[int, float]]] = [[]]
    last_comma = -1
    for token in tokens:
        chunk = out[-1]
        if token[0] == -1:
            out.append([])
            last_comma = -1
            continue
        if token[0] == comma:
            last_comma = len(chunk)
        elif len(chunk) == size and last_comma != -1 and len(chunk) - last_comma <= COMMA_BACKTRACK:
            rest = chunk[last_comma + 1:]
            del chunk[last_comma + 1:]
            out.append(rest)
            chunk, last_comma = rest, -1
        if len(chunk) == size or spans and len(chunk) + spans.get(token[0], 0) > size:
            out.append([])
            chunk, last_comma = out[-1], -1
        chunk.append(token)
    return out[:-1] if len(out) > 1 and not out[-1] else out
