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


# Known answers: the floor is by definition the FID of held-out
# real digits, and noise scores far above it.


def test_fid_floor_is_the_fid_of_the_held_out_real_images(cache_dir, data_dir):
    """With 500 held-out train digits as the evaluator's holdout, fid_real_floor(500) is by definition their
    FID against the reference (the test split), so evaluating exactly those images must give fid = floor; a
    finite sample of real digits sits clearly above 0. Uniform noise, evaluated first, must not move it."""
    train_images, train_labels = load_split(data_dir, train=True)
    test_images, test_labels = load_split(data_dir, train=False)
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(1))[:500]
    held_out, held_out_labels = train_images[pick], train_labels[pick]
    evaluator = MNISTEvaluator(
        load_classifier(cache_dir), test_images, test_labels, holdout_images=held_out, kid_subsets=10
    )
    noise = torch.randint(
        0, 256, (500, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    fake = evaluator.evaluate(noise, held_out_labels)
    real = evaluator.evaluate(held_out, held_out_labels)
    assert real["fid_real_floor_n"] == 500 and real["fid_real_floor"] > 1.0
    assert real["fid"] == pytest.approx(real["fid_real_floor"], rel=1e-3)
    assert fake["fid_real_floor"] == real["fid_real_floor"]
    assert real["accuracy"] > 0.97


def test_noise_scores_far_above_the_floor(cache_dir, data_dir):
    """The shipped evaluator (test split reference, train-split holdout): real train digits score near the
    floor (draws of 500 spread by about ±50%) with accuracy > 0.97; uniform noise scores > 100× the floor with
    chance accuracy (≈ 0.1); the floor is the same for both and clearly above 0."""
    evaluator = MNISTEvaluator.from_cache(cache_dir, data_dir, kid_subsets=10)
    train_images, train_labels = load_split(data_dir, train=True)
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(2))[:500]
    noise = torch.randint(
        0, 256, (500, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    fake = evaluator.evaluate(noise, train_labels[pick])
    real = evaluator.evaluate(train_images[pick], train_labels[pick])
    floor = real["fid_real_floor"]
    assert floor > 1.0 and fake["fid_real_floor"] == floor
    assert 0.4 * floor < real["fid"] < 2.5 * floor and real["accuracy"] > 0.97
    assert fake["fid"] > 100 * floor and fake["accuracy"] < 0.3
