"""Prompt -> token ids with the `tokenizers` library, as the torch TextEncoder reads prompts: chunks of
max_length - 2 tokens with emphasis weights (mobilediffusion.prompts, ComfyUI's rules)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..prompts import empty_chunk, weighted_chunks
from .manifest import BundleError


class BundleTokenizer:
    """`chunks(prompt) -> (ids (k, max_length) int32, weights (k, max_length) float32)` for k <= max_chunks
    (a longer prompt is cut, with a warning naming the limit)."""

    def __init__(self, folder: str | Path, spec: dict):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BundleError("running a bundle needs the tokenizers package: pip install tokenizers") from None
        self.tokenizer = Tokenizer.from_file(str(Path(folder) / spec["file"]))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = int(spec["max_length"])
        self.max_chunks = int(spec.get("max_chunks", 1))  # bundles from before long prompts take one chunk
        self.special = {"bos": int(spec["bos_token_id"]), "eos": int(spec["eos_token_id"]),
                        "pad": int(spec["pad_token_id"])}

    def _segment(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def chunks(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        ids, weights = weighted_chunks(prompt, self._segment, max_length=self.max_length, max_chunks=self.max_chunks,
                                       **self.special)
        return np.asarray(ids, np.int32), np.asarray(weights, np.float32)

    def empty(self) -> np.ndarray:
        """The empty prompt's ids (max_length,): what emphasis weights are measured from."""
        return np.asarray(empty_chunk(max_length=self.max_length, **self.special), np.int32)
