"""Captions -> a pretrained `transformers` text model (MiniLM, CLIP), usually frozen, -> a projection."""

from __future__ import annotations

import torch
from torch import nn

from diffusion_lab.condition import Condition
from diffusion_lab.nets.encoders.base import CaptionEncoder
from diffusion_lab.nets.encoders.cache import CaptionCache
from diffusion_lab.nets.encoders.hub import resolve_model_path


class HFTextEncoder(CaptionEncoder):
    """Caption -> `transformers` encoder (BERT/MiniLM via AutoModel, CLIP via CLIPTextModel) -> Linear.

    tokens = projected last hidden states (B, L, dim) with the attention mask; pooled = their masked
    mean. Give either `model` (a local folder, model package or cached hub id; offline only) or `config`,
    a dict for `AutoConfig.for_model` (e.g. {"model_type": "clip_text_model", "hidden_size": 32, ...})
    built with random weights; `tokenizer` (found like `model`) names whose tokenizer to use, `model`'s
    own by default. With `freeze` the backbone stays in eval mode without gradients and only the
    projection and the null token train.

    A frozen backbone gives the same states for a caption every epoch, so the first `cache_size` captions'
    states are cached (0: off; see `CaptionCache`). The cache is not in the state_dict; it is emptied
    whenever the weights may change (`.to()`/`.half()`, load_state_dict).
    """

    def __init__(
        self,
        model: str | None = None,
        dim: int = 128,
        max_length: int = 32,
        freeze: bool = True,
        drop_prob: float = 0.1,
        config: dict | None = None,
        cache_size: int = 100_000,
        tokenizer: str | None = None,
    ):
        super().__init__(dim, drop_prob, max_length)
        # transformers is an optional dependency ([text]): only caption models built on it need it
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

        if (model is None) == (config is None):
            raise ValueError("HFTextEncoder needs exactly one of `model` (a local path) or `config` (a dict)")
        if model is None and tokenizer is None:
            raise ValueError("HFTextEncoder with `config` needs a `tokenizer` (a local path, like `model`)")
        self.freeze, self.cache = freeze, CaptionCache(cache_size)
        path = None if model is None else resolve_model_path(model)
        self.tokenizer = AutoTokenizer.from_pretrained(
            path if tokenizer is None else resolve_model_path(tokenizer, "condition.tokenizer")
        )
        if path is not None:
            is_clip = AutoConfig.from_pretrained(path).model_type.startswith("clip")
            self.backbone = (CLIPTextModel if is_clip else AutoModel).from_pretrained(path)
        else:
            config = dict(config)  # Hydra's DictConfig -> plain dict
            for key, value in [
                ("vocab_size", len(self.tokenizer)),
                ("max_position_embeddings", max_length),
                ("pad_token_id", self.tokenizer.pad_token_id),
                ("bos_token_id", self.tokenizer.cls_token_id),
                ("eos_token_id", self.tokenizer.sep_token_id),
            ]:
                config.setdefault(key, value)
            self.backbone = AutoModel.from_config(AutoConfig.for_model(**config))
        # The cache keeps a caption's states as its first n positions: padding must go on the right.
        self.tokenizer.padding_side = "right"
        if freeze:
            self.backbone.requires_grad_(False).eval()
        self.proj = nn.Linear(self.backbone.config.hidden_size, dim)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.backbone.eval()  # a frozen backbone never uses dropout
        return self

    def forward(self, captions: list[str], force_drop: torch.Tensor | None = None) -> Condition:
        captions = list(captions)
        if self.freeze and self.cache.size > 0:
            hidden, mask = self.cache(captions, self._backbone)
            device = self.proj.weight.device
            hidden, mask = hidden.to(device, self.proj.weight.dtype), mask.to(device)
        else:
            hidden, mask = self._backbone(captions)
        return self._condition(self.proj(hidden), mask, force_drop)  # tokens (B, L, dim)

    def _backbone(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> last hidden states (B, L, hidden) and the attention mask (B, L) bool."""
        if not self.warned_cut:
            self.seen_text(captions)  # for its warning
        batch = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.proj.weight.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        return hidden, batch["attention_mask"].bool()

    def _cuts(self, captions: list[str]) -> list[tuple[int, str]]:
        # Uncut, with where each token ends in its caption; verbose=False: no warning from transformers.
        batch = self.tokenizer(
            captions, truncation=False, return_offsets_mapping=True, return_special_tokens_mask=True,
            verbose=False,
        )  # fmt: skip
        room = self.max_length - self.tokenizer.num_special_tokens_to_add()  # what truncation keeps
        cuts = []
        for caption, ids, offsets, special in zip(
            captions, batch["input_ids"], batch["offset_mapping"], batch["special_tokens_mask"], strict=True
        ):
            ends = [end for (_, end), is_special in zip(offsets, special, strict=True) if not is_special]
            seen = caption if len(ends) <= room else caption[: ends[room - 1]] if room > 0 else ""
            cuts.append((len(ids), seen))
        return cuts

    # The cache must always equal what the backbone gives now.
    def _apply(self, fn, *args, **kwargs):
        self.cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.cache.clear()
        super()._load_from_state_dict(*args, **kwargs)
