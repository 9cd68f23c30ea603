"""The evaluator's digit classifier (diffusion_lab/metrics/classifier.py): training on a slice of MNIST
reports each epoch's test accuracy, and a missing cached classifier says how to train one."""

from __future__ import annotations

import pytest

from diffusion_lab.data.mnist import load_split
from diffusion_lab.metrics.classifier import EvaluatorMissingError, load_classifier, predict, train_classifier
from tests.conftest import DATA_DIR


def test_training_reports_each_epochs_test_accuracy(capsys):
    """On a slice of MNIST: a line per epoch with the test accuracy after it (printed where no bar shows,
    as under pytest), the last being the returned model's; progress=False prints nothing."""
    images, labels = load_split(DATA_DIR, train=False)  # 1,024 digits to train on and 500 others to test on
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


def test_missing_classifier_says_how_to_train_it(tmp_path):
    with pytest.raises(EvaluatorMissingError, match="dlab-train-evaluator"):
        load_classifier(tmp_path)
