"""Condition encoders: what the model is told (a class label or a caption), as a `Condition`.

Classifier-free guidance dropout lives here (DiT's `LabelEmbedder.token_drop`): in train mode a
sample's condition is swapped for a learned null with probability `drop_prob`, and `null(B, device)`
gives the same null for sampling's unconditional pass. Every encoder has `dim` (the context width the
net reads as `${condition.dim}`) and `input_key` (which batch entry it encodes).

Class labels: `ClassEncoder` (labels.py). Captions: `LearnedTextEncoder` (learned.py: a word tokenizer
and a small transformer trained with the model) and `HFTextEncoder` (pretrained.py: a pretrained MiniLM
or CLIP text model, usually frozen, with its states cached). A caption longer than `max_length` tokens
is cut: `seen_text` gives what the model reads of each, and the first cut caption an encoder meets is a
warning. Spatial conditions (sketch, semantic map, low-res or masked image): `SpatialEncoder`
(spatial.py). Several at once: `CombinedEncoder` (combined.py), one encoder per named source.

The classes are re-exported here because configs, and the run configs saved in checkpoints, name them
as `diffusion_lab.nets.encoders.<Class>`.
"""

from diffusion_lab.nets.encoders.combined import CombinedEncoder
from diffusion_lab.nets.encoders.labels import ClassEncoder
from diffusion_lab.nets.encoders.learned import LearnedTextEncoder, WordTokenizer
from diffusion_lab.nets.encoders.pretrained import HFTextEncoder
from diffusion_lab.nets.encoders.spatial import SpatialEncoder

__all__ = [
    "ClassEncoder",
    "CombinedEncoder",
    "HFTextEncoder",
    "LearnedTextEncoder",
    "SpatialEncoder",
    "WordTokenizer",
]
