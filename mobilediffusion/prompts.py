"""Prompts as ComfyUI's CLIPTextEncode reads them: emphasis weights and chunks of 75 tokens.

Pure Python (no torch, no tokenizer of its own): the text encoder, the torch-free bundle runtime and, in
JavaScript, the web player (player/prompt.js) follow the same rules, those of ComfyUI's
`comfy/sd1_clip.py` (SDTokenizer.tokenize_with_weights, token_weights, ClipTokenWeightEncoder):

- Emphasis: `(text)` multiplies the weight by 1.1 (nested: 1.21, ...), `(text:1.5)` sets it; `\\(` and `\\)`
  are literal parentheses. Each weighted segment is tokenized on its own (no BOS/EOS).
- Chunks: a prompt of any length becomes chunks of `max_length` (77) ids, each BOS + up to 75 tokens + EOS +
  padding. A segment shorter than MAX_WORD_LENGTH tokens that does not fit in the current chunk moves whole to
  the next one (the current one is closed with EOS and padded); a longer one is split at the boundary.
- Encoding (`apply_weights`): the chunks are encoded one by one and concatenated along the tokens (77 k tokens);
  when any weight differs from 1, an empty prompt (BOS, EOS, padding) is encoded too and every weighted token
  becomes empty + weight * (token - empty).
- `embedding:NAME` (textual-inversion embeddings) is not supported: the name is left out with a warning, as
  ComfyUI does when it finds no such embedding file, and the text after it is kept.
"""
from __future__ import annotations

import logging
import math
import re

log = logging.getLogger(__name__)

MAX_WORD_LENGTH = 8  # a segment of fewer tokens is never split across two chunks (ComfyUI's max_word_length)
DEFAULT_CHUNKS = 3  # chunks an exported bundle takes by default (a UNet signature per context length)
EMBEDDING = "embedding:"
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))


def parse_weights(text: str) -> list[tuple[str, float]]:
    """The prompt as (segment, weight) pairs, parentheses resolved (ComfyUI's token_weights)."""
    for literal, code in _ESCAPES:
        text = text.replace(literal, code)
    return [(_unescape(segment), weight) for segment, weight in _token_weights(text, 1.0)]


def _unescape(text: str) -> str:
    for literal, code in _ESCAPES:
        text = text.replace(code, literal[1])
    return text


def _parentheses(text: str) -> list[str]:
    """Top-level pieces: plain runs and balanced (...) groups, in order (ComfyUI's parse_parentheses)."""
    out, current, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if current:
                    out.append(current)
                current = "("
            else:
                current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                out.append(current + ")")
                current = ""
            else:
                current += ch
        else:
            current += ch
    if current:
        out.append(current)
    return out


def _token_weights(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for piece in _parentheses(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner = piece[1:-1]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _token_weights(inner, inner_weight)
        else:
            out.append((piece, weight))
    return out


def _words(segment: str) -> list[str]:
    """A segment split before each `embedding:` that follows a space or newline; embedding names dropped
    (with a warning), the text after them kept (ComfyUI without the embedding file)."""
    parts = re.split(f" {EMBEDDING}|\n{EMBEDDING}", segment)
    words = [parts[0]] + [EMBEDDING + p for p in parts[1:]]
    out = []
    for word in (w for w in words if w != ""):
        if word.startswith(EMBEDDING):
            name, *rest = word[len(EMBEDDING):].strip("\n").split() or [""]
            leftover = " ".join(rest)
            stripped = name.strip(",")
            if len(stripped) < len(name):
                leftover = f"{name[len(stripped):]} {leftover}"
            log.warning("textual-inversion embeddings are not supported: %r was left out of the prompt (as ComfyUI "
                        "does without the embedding file)", EMBEDDING + name)
            if leftover == "":
                continue
            word = leftover
        out.append(word)
    return out


def token_groups(text: str, tokenize) -> list[list[tuple[int, float]]]:
    """[(token id, weight), ...] per word of the prompt; tokenize(str) -> ids without BOS/EOS."""
    groups = []
    for segment, weight in parse_weights(text):
        for word in _words(segment):
            groups.append([(int(t), weight) for t in tokenize(word)])
    return groups


def chunk(groups: list[list[tuple[int, float]]], *, bos: int, eos: int, pad: int,
          max_length: int) -> list[list[tuple[int, float]]]:
    """The token groups in chunks of `max_length` (id, weight) pairs: BOS ... EOS padding (ComfyUI's batching)."""
    chunks, current = [], [(bos, 1.0)]
    chunks.append(current)
    for group in groups:
        large = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(group) + len(current) > max_length - 1:
                room = max_length - len(current) - 1
                if large:  # split the word: what fits, then EOS
                    current.extend(group[:room])
                    current.append((eos, 1.0))
                    group = group[room:]
                else:  # close this chunk, the word moves to the next one
                    current.append((eos, 1.0))
                    current.extend([(pad, 1.0)] * room)
                current = [(bos, 1.0)]
                chunks.append(current)
            else:
                current.extend(group)
                group = []
    current.append((eos, 1.0))
    current.extend([(pad, 1.0)] * (max_length - len(current)))
    return chunks


def weighted_chunks(text: str, tokenize, *, bos: int, eos: int, pad: int, max_length: int,
                    max_chunks: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Prompt -> (ids, weights), each k chunks of max_length; at most `max_chunks` chunks (the rest is cut off
    with a warning naming the limit)."""
    chunks = chunk(token_groups(text, tokenize), bos=bos, eos=eos, pad=pad, max_length=max_length)
    if max_chunks is not None and len(chunks) > max_chunks:
        log.warning("the prompt is %d chunks of %d tokens, more than the %d this model takes: chunks %d and later "
                    "are cut off (%r)", len(chunks), max_length - 2, max_chunks, max_chunks + 1, text[-60:])
        chunks = chunks[:max_chunks]
    return [[t for t, _ in c] for c in chunks], [[w for _, w in c] for c in chunks]


def empty_chunk(*, bos: int, eos: int, pad: int, max_length: int) -> list[int]:
    """The empty prompt that weights are measured from: BOS, EOS, padding (ComfyUI's gen_empty_tokens)."""
    return [bos, eos] + [pad] * (max_length - 2)


def has_weights(weights) -> bool:
    return any(w != 1.0 for row in weights for w in row)


def common_length(lengths) -> int:
    """The length contexts of these token counts are repeated to before they are batched together: their least
    common multiple (ComfyUI's CONDCrossAttn.concat; attention over a context repeated n times equals attention
    over it once)."""
    return math.lcm(*lengths)


def context_lengths(max_chunks: int, tokens: int, *, mixed: bool) -> list[int]:
    """Context lengths (tokens) a UNet must take for prompts of 1..max_chunks chunks of `tokens`: each count, and
    with `mixed` (guidance or a batch batches prompts of different lengths) every common length of a mix."""
    counts = set(range(1, max_chunks + 1))
    while mixed:  # closed under lcm: a batch may mix any of them
        more = {math.lcm(a, b) for a in counts for b in counts} - counts
        if not more:
            break
        counts |= more
    return sorted(c * tokens for c in counts)
