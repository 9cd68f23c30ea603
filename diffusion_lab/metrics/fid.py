"""FID / KID in the MNIST classifier's feature space, conditional accuracy, and the real-vs-real floor.

Input convention: images are uint8 (N, 1, 28, 28) in [0, 255] — what `dlab-sample` writes to samples.npz.
Float images in [-1, 1] are accepted and quantised to uint8 first (`to_uint8`), so real and generated
images always pass through the same pipeline; FID is sensitive to such preprocessing differences.

The math is torchmetrics' (`FrechetInceptionDistance` / `KernelInceptionDistance` with a custom `feature`
module); this file only supplies the feature module, caches the real features, and adds the floor.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.classifier import MNISTClassifier, evaluator_dir, load_classifier
from diffusion_lab.metrics.provenance import digest
from diffusion_lab.utils.images import to_uint8

REAL_FEATURES_NAME = "real_features_{dataset}_test.pt"
KID_MAX_SUBSET = 1000  # torchmetrics' default; smaller N uses subsets of size N


class ClassifierFeatures(nn.Module):
    """The classifier's penultimate layer as a torchmetrics `feature` module.

    Input: uint8 (B, 1, 28, 28) or float in [-1, 1] (B, 1, 28, 28) → float32 (B, num_features). Use it with
    `FrechetInceptionDistance(feature=ClassifierFeatures(clf), normalize=False)` (normalize only matters for
    the built-in Inception). A float (B, num_features) input is taken as already-extracted features and
    returned unchanged: that lets cached real features and features shared with the accuracy pass go
    through torchmetrics' own update/compute without a second forward pass.
    """

    def __init__(self, classifier: MNISTClassifier, batch_size: int = 1000):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)  # a frozen evaluator from here on
        self.num_features = classifier.feature_dim  # read by torchmetrics instead of a dummy forward
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)  # always eval (BatchNorm, Dropout), like torchmetrics' Inception

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2 and x.is_floating_point() and x.shape[1] == self.num_features:
            return x
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"Expected images of shape (N, 1, 28, 28), got {tuple(x.shape)}")
        x = to_uint8(x)  # one pipeline for real and generated images
        return torch.cat([self.classifier.features(b) for b in x.split(self.batch_size)])


class MNISTEvaluator:
    """Scores generated digits against a real reference set (normally the MNIST test split).

    `evaluate(images, labels)` returns
      fid, kid_mean, kid_std   generated vs all M reference images, in classifier feature space
      accuracy                 fraction of images the classifier assigns the requested label
      per_class_accuracy       that fraction per requested label 0..9 (nan if a label was not requested)
      accuracy_real            the classifier's accuracy on the reference itself: the ceiling for `accuracy`
      fid_real_floor           the FID that N real images get, i.e. what sampling noise alone costs at this N
                               (FID is biased upwards at small N, so compare `fid` with this, not with 0):
                               - with `holdout_images` (real, disjoint from the reference; `from_cache` uses
                                 the train split): N held-out images vs the reference, the same protocol as
                                 `fid`, so a perfect generator scores ≈ this;
                               - otherwise two disjoint reference subsets of N each, which is pessimistic
                                 as both sides are noisy (mean over seeds at N = 1000: 12.6 vs 8.6).
                               One seeded draw: at N = 1000 draws spread by about ±15%.
      fid_real_floor_n         the N the floor used (capped by the real images available), n

    N must be at least `min_samples` = 2 · feature dim (256): below that the N × D feature covariance is
    rank-deficient and FID is meaningless. KID uses subsets of size min(N, 1000).
    Real features are computed once and, with `cache_path`, stored on disk keyed by a hash of the
    classifier weights and the real images, so later evaluators start instantly.
    `reference` names the reference set (e.g. {"name": "mnist", "split": "test"}); `self.reference` adds its
    size, a sha256 of its uint8 images and what the floor is measured against (metrics/provenance.py).
    """

    def __init__(
        self,
        classifier: MNISTClassifier,
        real_images: torch.Tensor,
        real_labels: torch.Tensor,
        holdout_images: torch.Tensor | None = None,
        cache_path: str | Path | None = None,
        kid_subsets: int = 100,
        seed: int = 0,
        reference: dict | None = None,
    ):
        self.extractor = ClassifierFeatures(classifier)
        self.classifier = self.extractor.classifier
        self.min_samples = 2 * self.extractor.num_features
        self.kid_subsets, self.seed = kid_subsets, seed
        images = {"real": to_uint8(real_images)}
        if holdout_images is not None:
            images["holdout"] = to_uint8(holdout_images)
        features = self._features(images, cache_path)
        self.real_features = features["real"]  # (M, D)
        self.holdout_features = features.get("holdout")  # (H, D) or None
        # What the scores are measured against (`reference`, e.g. {"name": "mnist", "split": "test"}, with
        # the size and a hash of the images added): recorded beside every score (metrics/provenance.py).
        held = images.get("holdout")
        self.reference = {
            **(reference or {"name": "custom"}),
            "size": len(images["real"]),
            "sha256": digest([images["real"]]),
            "floor_against": "reference halves" if held is None else "holdout",
            "holdout_size": None if held is None else len(held),
        }
        predicted = self.classifier.head(self.real_features).argmax(1)
        self.accuracy_real = (predicted == torch.as_tensor(real_labels)).float().mean().item()
        self.fid_metric = FrechetInceptionDistance(feature=self.extractor, reset_real_features=False)
        self.fid_metric.update(self.real_features, real=True)
        self._floor_cache: dict[int, tuple[float, int]] = {}

    @classmethod
    def from_cache(cls, cache_dir: str | Path, data_dir: str | Path, holdout: int = 10_000, **kwargs):
        """Cached classifier (`dlab-train-evaluator`) + MNIST test split as the reference + a seeded
        `holdout`-image subset of the train split for the floor; features cached next to the classifier."""
        images, labels = load_split(data_dir, train=False, dataset="mnist")
        train_images, _ = load_split(data_dir, train=True, dataset="mnist")
        pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[:holdout]
        path = evaluator_dir(cache_dir) / REAL_FEATURES_NAME.format(dataset="mnist")
        reference = {"name": "mnist", "split": "test", "holdout_split": "train", "holdout_seed": 0}
        return cls(
            load_classifier(cache_dir), images, labels, train_images[pick], cache_path=path, reference=reference,
            **kwargs,
        )  # fmt: skip

    def _features(self, images: dict[str, torch.Tensor], cache_path: str | Path | None) -> dict:
        # sha1 of the bytes alone: the key real-feature caches were written with
        key = digest([*self.classifier.state_dict().values(), *images.values()], "sha1")
        if cache_path is not None and Path(cache_path).is_file():
            cached = torch.load(cache_path, map_location="cpu", weights_only=True)
            if cached.get("fingerprint") == key:
                return cached["features"]
        features = {name: self.extractor(x) for name, x in images.items()}
        if cache_path is not None:
            Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"features": features, "fingerprint": key}, cache_path)
        return features

    # -----------------------------------------------------------------------------------------------------

    def fid_real_floor(self, n: int) -> tuple[float, int]:
        """(FID of n real images, the n used); see the class docstring. Seeded and memoised per n."""
        if n not in self._floor_cache:
            gen = torch.Generator().manual_seed(self.seed)
            metric = FrechetInceptionDistance(feature=self.extractor)
            if self.holdout_features is not None:
                m = min(n, len(self.holdout_features))
                metric.update(self.real_features, real=True)
                pick = torch.randperm(len(self.holdout_features), generator=gen)[:m]
                metric.update(self.holdout_features[pick], real=False)
            else:
                m = min(n, len(self.real_features) // 2)
                order = torch.randperm(len(self.real_features), generator=gen)
                metric.update(self.real_features[order[:m]], real=True)
                metric.update(self.real_features[order[m : 2 * m]], real=False)
            self._floor_cache[n] = (metric.compute().item(), m)
        return self._floor_cache[n]

    def require(self, n: int, key: str = "n") -> None:
        """Fail before sampling when `n` images are too few for a full-rank FID covariance."""
        if n < self.min_samples:
            raise ConfigError(
                f"{key}={n}: FID needs at least {self.min_samples} images (2 × feature dim "
                f"{self.extractor.num_features}) for a full-rank covariance; got N={n}. Raise {key}."
            )

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """Metrics for generated `images` (uint8 or [-1, 1] float, (N, 1, 28, 28); tensor or numpy, any
        device: the small classifier runs on CPU) that were asked to show `labels` (N,); keys: see the class
        docstring. `per_class_accuracy` may hold nan, so it is not a flat float for `metrics.json`."""
        images, labels = torch.as_tensor(images).detach().cpu(), torch.as_tensor(labels).long().cpu()
        n = len(images)
        self.require(n)
        if len(labels) != n:
            raise ValueError(f"Got {n} images but {len(labels)} labels")
        features = self.extractor(images)  # (N, D), shared by FID, KID and accuracy
        correct = self.classifier.head(features).argmax(1) == labels
        per_class = [correct[labels == c].float().mean().item() if (labels == c).any() else math.nan
                     for c in range(10)]  # fmt: skip

        self.fid_metric.reset()  # keeps the real statistics (reset_real_features=False)
        self.fid_metric.update(features, real=False)
        with warnings.catch_warnings():  # "KID stores all features": intended, N × 128 floats
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(
                feature=self.extractor, subsets=self.kid_subsets, subset_size=min(n, KID_MAX_SUBSET)
            )
        kid.update(self.real_features, real=True)
        kid.update(features, real=False)
        with torch.random.fork_rng():  # KID draws its subsets from the global RNG; keep runs reproducible
            torch.manual_seed(self.seed)
            kid_mean, kid_std = kid.compute()
        floor, floor_n = self.fid_real_floor(n)
        return {
            "fid": self.fid_metric.compute().item(),
            "kid_mean": kid_mean.item(),
            "kid_std": kid_std.item(),
            "accuracy": correct.float().mean().item(),
            "per_class_accuracy": per_class,
            "accuracy_real": self.accuracy_real,
            "fid_real_floor": floor,
            "fid_real_floor_n": floor_n,
            "n": n,
        }
