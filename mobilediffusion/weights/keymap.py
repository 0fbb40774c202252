"""Declarative checkpoint key maps and strict loading.

A KeyMap is an ordered table of (pattern, target) rules from a checkpoint's key names to
a module's parameter names. The first rule whose pattern matches the whole key wins;
`\\1`-style groups in the target are filled from the pattern. A target of None marks a
key that is deliberately not used (e.g. the VAE encoder when only the decoder is loaded).
A key that no rule matches is an error, so nothing in a checkpoint is dropped silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ..errors import CheckpointError


@dataclass(frozen=True)
class KeyMap:
    name: str  # what the table reads, for messages ("diffusers UNet")
    rules: tuple[tuple[str, str | None], ...]

    @cached_property
    def _compiled(self):
        return tuple((re.compile(p), t) for p, t in self.rules)

    def rename(self, keys) -> tuple[dict[str, str], list[str]]:
        """Map source keys to target names -> ({src: dst}, [keys no rule matched]).

        Keys whose rule target is None are left out of both.
        """
        mapping, unmatched = {}, []
        for key in keys:
            for pattern, target in self._compiled:
                m = pattern.fullmatch(key)
                if m:
                    if target is not None:
                        mapping[key] = m.expand(target)
                    break
            else:
                unmatched.append(key)
        return mapping, unmatched

    def apply(self, state: dict) -> dict:
        """Renamed copy of a state dict; raises CheckpointError on keys no rule knows."""
        mapping, unmatched = self.rename(state)
        if unmatched:
            raise CheckpointError(
                f"{len(unmatched)} keys are not part of a {self.name} checkpoint: {_few(unmatched)}; "
                "is this the right file for this component?"
            )
        return {dst: state[src] for src, dst in mapping.items()}


def load_state(module, state: dict, keymap: KeyMap | None = None, *, what: str = "model") -> None:
    """Load `state` (optionally renamed by `keymap`) into `module`, strictly.

    Every module parameter must be present and every checkpoint tensor used, with equal
    shapes; a tensor that differs from its parameter only by trailing singleton dims
    (1x1 conv <-> linear projection) is reshaped. Tensors are cast to the parameter's dtype.
    Raises CheckpointError naming missing, unexpected and mis-shaped keys.
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
        fixed[k] = t.to(dtype=p.dtype)
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
    module.load_state_dict(fixed, strict=True)


def _squeeze_trailing(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _few(items, n: int = 6) -> str:
    items = list(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
