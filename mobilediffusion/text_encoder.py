"""CLIP text encoder: prompts -> token ids (B, 77) -> context (B, 77, D) for the UNet.

The transformer is transformers' CLIPTextModel (CLIP ViT-L/14 for SD 1.x, BK-SDM, SDXS and
MobileDiffusion; the OpenCLIP-H text tower as diffusers stores it for SD 2.x), and the
tokenizer is transformers' CLIPTokenizer reading the packaged CLIP ViT-L/14 vocabulary
unless a checkpoint brings its own.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .config import TextEncoderConfig

log = logging.getLogger(__name__)

PACKAGED_TOKENIZER = Path(__file__).parent / "assets" / "clip-vit-large-patch14"


def load_tokenizer(folder: str | Path | None = None, *, pad_token: str | None = None):
    """A CLIPTokenizer from `folder` (vocab.json + merges.txt), default the packaged ViT-L/14 one."""
    from transformers import CLIPTokenizer

    kwargs = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(str(folder or PACKAGED_TOKENIZER), **kwargs)


class TextEncoder(nn.Module):
    """`tokenize(prompts) -> ids (B, T) int64`, `encode(ids) -> context (B, T, hidden_size)`.

    The context is the last hidden state after the final layer norm, as SD pipelines use it.
    """

    def __init__(self, cfg: TextEncoderConfig, tokenizer=None, *, device=None, dtype=None):
        super().__init__()
        from transformers import CLIPTextModel

        self.config = cfg
        self.model = CLIPTextModel(cfg.to_transformers()).to(device=device, dtype=dtype)
        self._tokenizer = tokenizer  # None: the packaged ViT-L/14 vocabulary, loaded on first use

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(pad_token=self.config.pad_token)
        return self._tokenizer

    @property
    def key_prefix(self) -> str:
        """Prefix of the transformer's own parameter names: "text_model." in transformers 4, "" in 5."""
        return "text_model." if hasattr(self.model, "text_model") else ""

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, max_length) int64: BOS, tokens, EOS, padding; longer prompts are cut (logged)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        full = self.tokenizer(list(prompts), truncation=False).input_ids
        for prompt, ids in zip(prompts, full):
            if len(ids) > self.max_length:
                log.warning(
                    "prompt is %d tokens, longer than the text encoder's %d; the end is cut off: %r",
                    len(ids), self.max_length, prompt[-60:],
                )
        out = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return out.input_ids.to(torch.long)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> context (B, T, D) on the encoder's device and dtype."""
        device = next(self.model.parameters()).device
        return self.model(input_ids=ids.to(device)).last_hidden_state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encode(ids)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context (B, T, D)."""
        return self.encode(self.tokenize(prompts))
