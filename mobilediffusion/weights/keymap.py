"""Declarative checkpoint key maps and strict loading.

A KeyMap is an ordered table of (pattern, target) rules from a checkpoint's key names to
a module's parameter names. The first rule whose pattern matches the whole key wins;
`\\1`-style groups in the target are filled from the pattern. A target of None marks a
key that is deliberately not used (e.g. the VAE encoder when only the decoder is loaded).
A target that is a tuple of names splits the tensor into that many equal chunks along
dim 0, one per name (a fused q/k/v projection -> to_q, to_k, to_v).
A key that no rule matches is an error, so nothing in a checkpoint is dropped silently.

The same table runs backwards (`KeyMap.reverse`: module names -> checkpoint names, chunks
concatenated) for the rules whose pattern is plain text plus groups the target uses; an
optional group `(?:a\\.|b\\.)?` is written as its first alternative, the canonical spelling.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

from ..errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class KeyMap:
    name: str  # what the table reads, for messages ("diffusers UNet")
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]

    @cached_property
    def _compiled(self):
        return _compile_rules(self.rules)

    def rename(self, keys) -> tuple[dict, list[str]]:
        """Map source keys to target names -> ({src: dst or (dst, ...)}, [keys no rule matched]).

        Keys whose rule target is None are left out of both.
        """
        mapping, unmatched = {}, []
        for key in keys:
            for pattern, target in self._compiled:
                m = pattern.fullmatch(key)
                if m:
                    if isinstance(target, tuple):
                        mapping[key] = tuple(m.expand(t) for t in target)
                    elif target is not None:
                        mapping[key] = m.expand(target)
                    break
            else:
                unmatched.append(key)
        return mapping, unmatched

    def apply(self, state: dict) -> dict:
        """Renamed copy of a state dict; raises CheckpointError on keys no rule knows, on two keys
        landing on one name, and on a fused tensor that does not split evenly."""
        mapping, unmatched = self.rename(state)
        if unmatched:
            raise CheckpointError(
                f"{len(unmatched)} keys are not part of a {self.name} checkpoint: {_few(unmatched)}; "
                "is this the right file for this component?"
            )
        out, source_of = {}, {}
        for src, dst in mapping.items():
            t = state[src]
            if isinstance(dst, tuple):
                if t.ndim == 0 or t.shape[0] % len(dst):
                    raise CheckpointError(
                        f"{src} {tuple(t.shape)} cannot be split into {len(dst)} equal parts along dim 0 "
                        f"({', '.join(dst)}); the {self.name} checkpoint is damaged"
                    )
                pieces = dict(zip(dst, t.chunk(len(dst), dim=0)))
            else:
                pieces = {dst: t}
            for name, piece in pieces.items():
                if name in out:
                    raise CheckpointError(
                        f"{source_of[name]} and {src} both map to {name}; a {self.name} checkpoint holds one "
                        "of them: remove the duplicate"
                    )
                out[name], source_of[name] = piece, src
        return out

    # ----------------------------------------------------------------------- inverse
    @cached_property
    def _inverse(self) -> tuple:
        """Per invertible rule: (rule index, element index or None, regex over module names, source tokens)."""
        out = []
        for r, (pattern, target) in enumerate(self.rules):
            if target is None:
                continue
            try:
                tokens, groups, aliases = _parse_pattern(pattern)
                elements = target if isinstance(target, tuple) else (target,)
                for e, t in enumerate(elements):
                    own = _template_regex(t, groups, aliases)
                    out.append((r, e if isinstance(target, tuple) else None, own, tokens))
            except _NotInvertible:
                continue  # such a rule only reads; a module name no other rule writes is reported by name
        return tuple(out)

    def reverse(self, state: dict) -> dict:
        """Module state (own names) -> checkpoint state (this table's source names): the inverse of
        `apply`. Chunked targets are concatenated back along dim 0. Raises ConfigError for a name
        the table cannot write, and checks that `apply` maps the result back onto the same names."""
        plain, fused, unwritable = {}, {}, []
        for name in state:
            for r, e, own, tokens in self._inverse:
                m = own.fullmatch(name)
                if m:
                    src = "".join(tok if isinstance(tok, str) else m.group(f"g{tok}") for tok in tokens)
                    if e is None:
                        if src in plain:
                            raise ConfigError(f"{plain[src]} and {name} would both be written as {src}")
                        plain[src] = name
                    else:
                        fused.setdefault((src, r), {})[e] = name
                    break
            else:
                unwritable.append(name)
        if unwritable:
            raise ConfigError(f"{len(unwritable)} parameters have no place in a {self.name} checkpoint: "
                              f"{_few(unwritable)}")
        out, expect = {}, {}
        for src, name in plain.items():
            out[src], expect[src] = state[name], name
        for (src, r), parts in fused.items():
            n = len(self.rules[r][1])
            if sorted(parts) != list(range(n)):
                raise ConfigError(f"{src} fuses {n} tensors but only {len(parts)} are present: {_few(parts.values())}")
            names = tuple(parts[e] for e in range(n))
            out[src], expect[src] = _cat([state[k] for k in names]), names
        # the round trip must land on the same names (an earlier rule could claim a written key)
        back, unmatched = self.rename(out)
        wrong = sorted(k for k in out if back.get(k) != expect[k])
        if unmatched or wrong:
            raise ConfigError(f"the {self.name} table does not invert cleanly for {_few(unmatched + wrong)}")
        return out


def load_state(module, state: dict, keymap: KeyMap | None = None, *, what: str = "model", assign: bool = False,
               memory_format=None) -> None:
    """Load `state` (optionally renamed by `keymap`) into `module`, strictly.

    Every module parameter must be present and every checkpoint tensor used, with equal
    shapes; a tensor that differs from its parameter only by trailing singleton dims
    (1x1 conv <-> linear projection) is reshaped. Tensors are cast to the parameter's dtype.
    Raises CheckpointError naming missing, unexpected and mis-shaped keys.
    assign: the module's tensors become the checkpoint's (cast when the dtype differs) instead of being
    copied into, as a module built on the meta device needs (weights/materialize.py); tensors that share
    memory (tied in a pickle) or are not contiguous are copied, so no two parameters share memory.
    memory_format: 4-D tensors are cast into this layout (e.g. torch.channels_last, the CPU fast path's) in
    the same copy as the dtype, instead of a second copy when the module is converted afterwards.
    """
    # 1. rename
    state = keymap.apply(state) if keymap is not None else dict(state)
    own = module.state_dict()
    # 2. compare names
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    # 3. compare shapes
    fixed, mismatched = {}, []
    for k in sorted(set(own) & set(state)):
        t, p = state[k], own[k]
        if tuple(t.shape) != tuple(p.shape):
            if _squeeze_trailing(t.shape) == _squeeze_trailing(p.shape):
                t = t.reshape(p.shape)
            else:
                mismatched.append(f"{k} {tuple(t.shape)} vs {tuple(p.shape)}")
                continue
        fixed[k] = t.to(dtype=p.dtype, memory_format=memory_format) if memory_format is not None and t.dim() == 4 \
            else t.to(dtype=p.dtype)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_few(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors do not fit the config (checkpoint vs model): {_few(mismatched)}")
    if problems:
        raise CheckpointError(
            f"the {what} checkpoint does not fit its config: " + "; ".join(problems)
            + ". Check that the config (preset or config.json) belongs to these weights."
        )
    # 4. load (strict: the sets are equal)
    module.load_state_dict(_unshared(fixed) if assign else fixed, strict=True, assign=assign)


def _unshared(state: dict) -> dict:
    """state with every tensor dense (contiguous, or channels_last if it is so already) and in memory no other
    tensor of it overlaps (later ones copied, keeping their layout)."""
    import torch

    spans, out = [], {}
    for k, t in state.items():
        if not (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
            t = t.contiguous()
        start = t.data_ptr()
        spans.append((start, start + t.numel() * t.element_size(), k))
        out[k] = t
    spans.sort()
    end = None
    for start, stop, k in spans:
        if end is not None and start < end and stop > start:
            out[k] = out[k].clone()  # preserve_format: a dense tensor keeps its strides
        else:
            end = stop if end is None else max(end, stop)
    return out


@lru_cache(maxsize=64)
def _compile_rules(rules: tuple) -> tuple:
    """The rules with their patterns compiled, shared by equal tables (key maps are rebuilt per config)."""
    return tuple((re.compile(p), t) for p, t in rules)


def _squeeze_trailing(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _few(items, n: int = 6) -> str:
    items = list(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _cat(tensors):
    import torch

    return torch.cat(tensors, dim=0)


# --------------------------------------------------------------------------- pattern inversion
class _NotInvertible(Exception):
    pass


_META = set(".^$*+?{}[]|")


def _parse_pattern(p: str) -> tuple[list, dict, dict]:
    """A pattern made of literal text, capturing groups and optional non-capturing alternations ->
    (tokens: literal str | group number, {group number: its regex}, {group name or number: number})."""
    tokens, groups, aliases, number, i = [], {}, {}, 0, 0
    while i < len(p):
        c = p[i]
        if c == "\\":
            nxt = p[i + 1: i + 2]
            if not nxt or nxt.isalnum():
                raise _NotInvertible(p)  # \d, \w, back-references: a class, not one character
            tokens.append(nxt)
            i += 2
        elif c == "(":
            j = _closing(p, i)
            inner, quant = p[i + 1: j], p[j + 1: j + 2]
            if inner.startswith("?:"):
                alternatives = _split_top(inner[2:])
                if quant == "?" or len(alternatives) == 1:
                    tokens.append(_literal(alternatives[0]))  # an optional part is written as its first spelling
                    i = j + (2 if quant == "?" else 1)
                    continue
                raise _NotInvertible(p)
            if quant and quant in "?*+{":
                raise _NotInvertible(p)
            number += 1
            if inner.startswith("?P<"):
                name, content = inner[3:].split(">", 1)
            elif inner.startswith("?"):
                raise _NotInvertible(p)
            else:
                name, content = number, inner
            if re.search(r"\((?!\?:)", content.replace("\\(", "")):
                raise _NotInvertible(p)  # nested capturing groups
            groups[number] = content
            aliases[name] = aliases[number] = number
            tokens.append(number)
            i = j + 1
        elif c in _META:
            raise _NotInvertible(p)
        else:
            tokens.append(c)
            i += 1
    merged = []  # join consecutive literal characters
    for tok in tokens:
        if isinstance(tok, str) and merged and isinstance(merged[-1], str):
            merged[-1] += tok
        else:
            merged.append(tok)
    return merged, groups, aliases


def _closing(p: str, i: int) -> int:
    depth, k, in_class = 0, i, False
    while k < len(p):
        c = p[k]
        if c == "\\":
            k += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return k
        k += 1
    raise _NotInvertible(p)


def _split_top(s: str) -> list[str]:
    parts, depth, start, k = [], 0, 0, 0
    while k < len(s):
        c = s[k]
        if c == "\\":
            k += 2
            continue
        depth += (c == "(") - (c == ")")
        if c == "|" and depth == 0:
            parts.append(s[start:k])
            start = k + 1
        k += 1
    return parts + [s[start:]]


def _literal(s: str) -> str:
    out, k = [], 0
    while k < len(s):
        if s[k] == "\\" and k + 1 < len(s) and not s[k + 1].isalnum():
            out.append(s[k + 1])
            k += 2
        elif s[k] in _META or s[k] in "()\\":
            raise _NotInvertible(s)
        else:
            out.append(s[k])
            k += 1
    return "".join(out)


_REF = re.compile(r"\\g<(\w+)>|\\(\d{1,2})")


def _template_regex(template: str, groups: dict, aliases: dict):
    """A target template (`down.\\g<i>.res.\\1`) as a regex over module names whose group `g<n>`
    captures source group n with the source's own sub-pattern; every source group must appear."""
    parts, seen, pos = [], set(), 0
    for m in _REF.finditer(template):
        parts.append(re.escape(template[pos: m.start()]))
        ref = m.group(1) or m.group(2)
        n = aliases.get(int(ref) if ref.isdigit() else ref)
        if n is None:
            raise _NotInvertible(template)
        parts.append(f"(?P=g{n})" if n in seen else f"(?P<g{n}>{groups[n]})")
        seen.add(n)
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    if seen != set(groups):
        raise _NotInvertible(template)  # a source group the target drops cannot be recovered
    return re.compile("".join(parts))
