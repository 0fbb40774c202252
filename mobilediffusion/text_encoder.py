"""CLIP text encoder: prompts -> chunks of token ids (k, 77) -> context (B, 77 k, D) for the UNet.

The transformer is transformers' CLIPTextModel (CLIP ViT-L/14 for SD 1.x, BK-SDM, SDXS and
MobileDiffusion; the OpenCLIP-H text tower as diffusers stores it for SD 2.x), and the
tokenizer is transformers' CLIPTokenizer reading the packaged CLIP ViT-L/14 vocabulary
unless a checkpoint brings its own. Prompts are read as ComfyUI's CLIPTextEncode reads them
(mobilediffusion.prompts): any length in chunks of 75 tokens, `(word:1.2)` emphasis.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from . import prompts as prompt_rules
from .config import TextEncoderConfig
from .guidance import batch_contexts

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

    @property
    def special_tokens(self) -> dict:
        """{"bos", "eos", "pad"} token ids, as the chunks of a prompt use them."""
        tok = self.tokenizer
        return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}

    def chunks(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt of any length -> (ids (k, max_length) int64, weights (k, max_length) float32): chunks of 75
        tokens with their own BOS/EOS and the prompt's emphasis weights (mobilediffusion.prompts)."""
        ids, weights = prompt_rules.weighted_chunks(
            prompt, self._segment_ids, max_length=self.max_length, **self.special_tokens)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)

    def _segment_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, verbose=False)["input_ids"][1:-1]  # without BOS/EOS

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, max_length) int64: BOS, tokens, EOS, padding; longer prompts are cut (logged). One chunk
        of each prompt without weights, for training and tracing; `encode_prompts` reads whole prompts."""
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
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """One prompt -> context (1, 77 k, D) in the encoder's dtype: its chunks encoded one by one and concatenated,
        emphasis applied against the empty prompt in float32 (ComfyUI's encode_token_weights)."""
        ids, weights = self.chunks(prompt)  # (k, 77) each
        k = ids.shape[0]
        weighted = prompt_rules.has_weights(weights.tolist())
        if weighted:
            empty = prompt_rules.empty_chunk(max_length=self.max_length, **self.special_tokens)
            ids = torch.cat([ids, torch.tensor([empty], dtype=torch.long)])
        z = self.encode(ids)  # (k [+ 1], 77, D)
        if weighted:
            context, empty = z[:k].float(), z[k:].float()
            w = weights.to(z.device)[..., None]  # (k, 77, 1)
            z = torch.where(w != 1.0, (context - empty) * w + empty, context).to(z.dtype)
        return z.reshape(1, k * self.max_length, -1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context (B, T, D); prompts of different lengths are repeated to a common one
        (prompts.common_length, exact for attention)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return batch_contexts([self.encode_prompt(p) for p in prompts])
