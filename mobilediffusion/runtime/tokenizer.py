"""Prompt -> token ids with the `tokenizers` library, equal to the torch TextEncoder.tokenize."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import BundleError


class BundleTokenizer:
    """`__call__(prompts) -> ids (B, max_length) int32`: BOS, the prompt's tokens (cut to max_length - 2),
    EOS, then padding, as CLIPTokenizer(padding="max_length", truncation=True) does."""

    def __init__(self, folder: str | Path, spec: dict):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BundleError("running a bundle needs the tokenizers package: pip install tokenizers") from None
        self.tokenizer = Tokenizer.from_file(str(Path(folder) / spec["file"]))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = int(spec["max_length"])
        self.bos, self.eos, self.pad = int(spec["bos_token_id"]), int(spec["eos_token_id"]), int(spec["pad_token_id"])

    def __call__(self, prompts) -> np.ndarray:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = np.full((len(prompts), self.max_length), self.pad, dtype=np.int32)  # (B, T)
        for row, enc in zip(out, self.tokenizer.encode_batch(prompts, add_special_tokens=False)):
            ids = [self.bos, *enc.ids[: self.max_length - 2], self.eos]
            row[: len(ids)] = ids
        return out
