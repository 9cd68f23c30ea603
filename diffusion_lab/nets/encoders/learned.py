"""Captions -> a hashed word tokenizer and a small transformer trained with the model (no download)."""

from __future__ import annotations

import re
import zlib

import torch
from torch import nn

from diffusion_lab.condition import Condition
from diffusion_lab.errors import ConfigError
from diffusion_lab.nets.encoders.base import CaptionEncoder

WORD = re.compile(r"[^\W_]+")  # what WordTokenizer calls a word


class WordTokenizer:
    """Words -> ids without any vocabulary file, the same on every machine and in every process.

    Lowercase, split on non-alphanumerics, and hash each word with crc32 (Python's `hash()` of a str
    is salted per process) into `vocab_size - 2` buckets; distinct words may share a bucket. Id 0 is
    padding and id 1 a [CLS] that starts every caption, so even "" has one real token.
    """

    pad_id, cls_id = 0, 1

    def __init__(self, vocab_size: int = 4096, max_length: int = 32):
        if vocab_size < 3 or max_length < 1:
            raise ConfigError(
                f"condition.vocab_size={vocab_size} must be >= 3 and condition.max_length={max_length} >= 1"
            )
        self.vocab_size, self.max_length = vocab_size, max_length

    def encode(self, caption: str) -> list[int]:
        words = WORD.findall(caption.lower())
        ids = [2 + zlib.crc32(word.encode()) % (self.vocab_size - 2) for word in words]
        return [self.cls_id, *ids][: self.max_length]

    def cut(self, caption: str) -> tuple[int, str]:
        """(tokens of the caption, [CLS] included; the caption up to the last word `encode` keeps)."""
        words = list(WORD.finditer(caption))
        if len(words) < self.max_length:
            return 1 + len(words), caption
        kept = words[: self.max_length - 1]  # [CLS] takes one place
        return 1 + len(words), caption[: kept[-1].end()] if kept else ""

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, L) long, right-padded with pad_id, and mask (B, L) bool, True for real tokens."""
        rows = [self.encode(c) for c in captions]
        length = max(map(len, rows), default=1)
        ids = torch.tensor([row + [self.pad_id] * (length - len(row)) for row in rows], dtype=torch.long)
        ids = ids.view(len(rows), length)  # also (0, 1) for no captions
        return ids, ids != self.pad_id


class LearnedTextEncoder(CaptionEncoder):
    """Caption -> WordTokenizer -> a small pre-norm transformer trained with the model (no download).

    tokens = the final hidden states (B, L, dim) with the padding mask; pooled = their masked mean.
    """

    def __init__(
        self,
        dim: int = 128,
        layers: int = 2,
        heads: int = 4,
        vocab_size: int = 4096,
        max_length: int = 32,
        dropout: float = 0.0,
        drop_prob: float = 0.1,
    ):
        super().__init__(dim, drop_prob, max_length)
        if dim % heads:
            raise ConfigError(f"condition.dim={dim} must be divisible by condition.heads={heads}")
        self.tokenizer = WordTokenizer(vocab_size, max_length)
        self.embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.positions = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # Pre-norm layers leave the residual stream unnormalised, hence the final LayerNorm (as in GPT-2).
        self.transformer = nn.TransformerEncoder(
            layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )

    def forward(self, captions: list[str], force_drop: torch.Tensor | None = None) -> Condition:
        if not self.warned_cut:
            self.seen_text(captions)  # for its warning
        device = self.null_token.device
        ids, mask = (t.to(device) for t in self.tokenizer(list(captions)))  # (B, L)
        h = self.embedding(ids) + self.positions[: ids.shape[1]]  # (B, L, dim)
        return self._condition(self.transformer(h, src_key_padding_mask=~mask), mask, force_drop)

    def _cuts(self, captions: list[str]) -> list[tuple[int, str]]:
        return [self.tokenizer.cut(c) for c in captions]
