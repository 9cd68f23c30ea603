"""The MNIST evaluator (diffusion_lab/metrics/fid.py): classifier features for FID/KID, conditional
accuracy, the real-vs-real floor and the cached real features.

The classifier is trained once per machine by the `cache_dir` session fixture (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from diffusion_lab.data.mnist import load_split
from diffusion_lab.metrics.classifier import evaluator_dir, load_classifier
from diffusion_lab.metrics.fid import ClassifierFeatures, MNISTEvaluator
from tests.conftest import DATA_DIR


@pytest.fixture(scope="session")
def evaluator(cache_dir) -> MNISTEvaluator:
    return MNISTEvaluator.from_cache(cache_dir, DATA_DIR)


@pytest.fixture(scope="session")
def test_split():
    return load_split(DATA_DIR, train=False)


def test_classifier_passed_its_accuracy_bar(cache_dir, evaluator):
    _, info = load_classifier(cache_dir, return_info=True)
    assert info["test_accuracy"] >= 0.99
    assert evaluator.accuracy_real == pytest.approx(info["test_accuracy"], abs=1e-6)


def test_feature_module_works_in_torchmetrics_fid(evaluator, test_split):
    images = test_split[0][:500]
    features = ClassifierFeatures(evaluator.classifier)
    assert features.num_features == 128
    # uint8 and [-1, 1] floats are the same images to the feature module
    assert torch.allclose(features(images), features(images.float() / 127.5 - 1))
    fid = FrechetInceptionDistance(feature=features)
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(fid.compute().item()) < 1e-3


def test_fid_separates_real_digits_from_noise(evaluator):
    train_images, train_labels = load_split(DATA_DIR, train=True)
    pick = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(1))[:1000]
    real = evaluator.evaluate(train_images[pick], train_labels[pick])
    noise = torch.randint(
        0, 256, (1000, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    fake = evaluator.evaluate(noise, train_labels[pick])
    assert real["n"] == 1000 and real["fid_real_floor_n"] == 1000
    # real train digits score near the floor (another seeded draw of 1000 train digits) ...
    assert real["fid"] < 2 * real["fid_real_floor"]
    # ... and noise is orders of magnitude worse, by FID and KID alike
    assert fake["fid"] > 100 * real["fid"]
    assert fake["kid_mean"] > 100 * max(real["kid_mean"], real["kid_std"])


def test_conditional_accuracy(evaluator, test_split):
    images, labels = test_split[0][:1000], test_split[1][:1000]
    result = evaluator.evaluate(images, labels)
    assert result["accuracy"] >= 0.99
    assert len(result["per_class_accuracy"]) == 10
    assert min(result["per_class_accuracy"]) > 0.95
    shuffled = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    assert 0.05 < evaluator.evaluate(images, shuffled)["accuracy"] < 0.16


def test_too_few_samples_is_a_clear_error(evaluator, test_split):
    with pytest.raises(ValueError, match=r"at least 256 .*N=255"):
        evaluator.evaluate(test_split[0][:255], test_split[1][:255])


def test_real_features_are_cached(cache_dir, evaluator):
    path = evaluator_dir(cache_dir) / "real_features_mnist_test.pt"
    assert path.is_file()
    again = MNISTEvaluator.from_cache(cache_dir, DATA_DIR)
    assert torch.equal(again.real_features, evaluator.real_features)
    assert again.real_features.shape == (10_000, 128)
