"""The MNIST evaluator: classifier features for FID/KID, conditional accuracy, floors, caching, CLI.

The classifier is trained once per machine by the `cache_dir` session fixture (tests/conftest.py).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.image.fid import FrechetInceptionDistance

from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.classifier import (
    EvaluatorMissingError,
    evaluator_dir,
    load_classifier,
    predict,
    train_classifier,
)
from diffusion_lab.metrics.fid import ClassifierFeatures, MNISTEvaluator
from diffusion_lab.metrics.train_evaluator import train_evaluator
from tests.conftest import DATA_DIR, run_cli


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


def test_training_reports_each_epochs_test_accuracy(test_split, capsys):
    """On a slice of MNIST: a line per epoch with the test accuracy after it (printed where no bar shows,
    as under pytest), the last being the returned model's; progress=False prints nothing."""
    images, labels = test_split  # 1,024 digits to train on and 500 others to test on
    data = (images[:1024], labels[:1024], images[-500:], labels[-500:])
    model, info = train_classifier(*data, epochs=2, batch_size=64, lr=3e-3)
    out = capsys.readouterr().out
    first, last = info["epoch_accuracy"]
    assert last == info["test_accuracy"] == (predict(model, data[2]) == data[3]).float().mean().item()
    assert f"classifier epoch 1/2: test accuracy {first:.4f}" in out
    assert f"classifier epoch 2/2: test accuracy {last:.4f}" in out
    assert last > 0.5  # 2 epochs of 1,024 digits: far above chance (0.1)
    train_classifier(*data, epochs=1, batch_size=512, progress=False)
    assert capsys.readouterr().out == ""


def test_zero_epochs_is_a_clear_error(tmp_path):
    cfg = OmegaConf.create({"paths": {"cache_dir": str(tmp_path), "data_dir": str(DATA_DIR)},
                            "retrain": True, "classifier": {"epochs": 0}})  # fmt: skip
    with pytest.raises(ConfigError, match="classifier.epochs=0: expected a positive whole number"):
        train_evaluator(cfg)


def test_missing_classifier_says_how_to_train_it(tmp_path):
    with pytest.raises(EvaluatorMissingError, match="dlab-train-evaluator"):
        load_classifier(tmp_path)


def test_accuracy_below_the_bar_fails_loudly(cache_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(evaluator_dir(cache_dir), evaluator_dir(cache))
    proc = run_cli(
        "dlab-train-evaluator", "min_accuracy=1.01", cwd=tmp_path, env={"DLAB_CACHE_DIR": str(cache)}
    )
    assert proc.returncode == 1
    assert "min_accuracy=1.01" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_reuses_the_cache_and_reports_accuracy(cache_dir, tmp_path):
    """The installed `dlab-train-evaluator`, from an empty folder, on a copy of the cache."""
    cache = tmp_path / "cache"
    shutil.copytree(evaluator_dir(cache_dir), evaluator_dir(cache))
    (evaluator_dir(cache) / "real_features_mnist_test.pt").unlink()  # must be rebuilt
    cwd = tmp_path / "empty"
    cwd.mkdir()
    proc = run_cli("dlab-train-evaluator", "floor_sizes=[500]", cwd=cwd, env={"DLAB_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert "Evaluator classifier test accuracy: 0.99" in proc.stdout
    assert "FID floor at N=500" in proc.stdout
    assert (evaluator_dir(cache) / "real_features_mnist_test.pt").is_file()
    assert list((cwd / "outputs" / "evaluator" / "runs").glob("*/.hydra/config.yaml"))
