"""`dlab-train-evaluator`: train the MNIST evaluator classifier once and cache it with the real statistics.

    dlab-train-evaluator                       # reuses a cached classifier if there is one
    dlab-train-evaluator retrain=true classifier.epochs=3

Writes `<paths.cache_dir>/evaluator/{classifier.pt, classifier.json, real_features_mnist_test.pt}`.
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.cli import hydra_app
from diffusion_lab.data.mnist import load_split
from diffusion_lab.errors import UserError
from diffusion_lab.metrics.classifier import (
    ACCURACY_NAME,
    EvaluatorMissingError,
    evaluator_dir,
    load_classifier,
    save_classifier,
    train_classifier,
)
from diffusion_lab.metrics.fid import MNISTEvaluator
from diffusion_lab.utils import checks

log = logging.getLogger(__name__)


def train_evaluator(cfg: DictConfig) -> dict:
    """Train (or reuse) the classifier, check its test accuracy, cache the real test-split features.

    Returns the classifier info (test_accuracy, train_seconds, ...) plus `fid_real_floor` per N.
    Raises UserError when the test accuracy is below `cfg.min_accuracy`; nothing is cached then.
    """
    cache_dir, data_dir = cfg.paths.cache_dir, cfg.paths.data_dir
    info = None
    if not cfg.retrain:
        try:
            _, info = load_classifier(cache_dir, return_info=True)
            log.info("Reusing the classifier in %s (retrain=true trains anew)", evaluator_dir(cache_dir))
        except EvaluatorMissingError:
            pass
    if info is None:
        epochs = checks.positive_int(cfg, "classifier.epochs", 2)
        train, test = load_split(data_dir, train=True), load_split(data_dir, train=False)
        print(
            f"Training the evaluator classifier: {epochs} epochs over {len(train[1])} digits, each followed "
            f"by its accuracy on {len(test[1])} test digits (minutes on a CPU; the README has a time)"
        )
        model, info = train_classifier(*train, *test, **OmegaConf.to_container(cfg.classifier))
        if info["test_accuracy"] < cfg.min_accuracy:
            raise UserError(
                f"The evaluator classifier reached only {info['test_accuracy']:.4f} test accuracy "
                f"(< min_accuracy={cfg.min_accuracy}); FID/accuracy built on it would mislead, so nothing "
                f"was cached. Train longer, e.g. `dlab-train-evaluator retrain=true classifier.epochs=3`."
            )
        path = save_classifier(model, info, cache_dir)
        log.info("Saved the classifier to %s (%.0f s of training)", path, info["train_seconds"])
    elif info["test_accuracy"] < cfg.min_accuracy:
        raise UserError(
            f"The cached classifier's test accuracy {info['test_accuracy']:.4f} is below "
            f"min_accuracy={cfg.min_accuracy}; run `dlab-train-evaluator retrain=true`."
        )
    print(f"Evaluator classifier test accuracy: {info['test_accuracy']:.4f}")

    evaluator = MNISTEvaluator.from_cache(cache_dir, data_dir)  # computes + caches real features if stale
    floors = {str(n): evaluator.fid_real_floor(n)[0] for n in cfg.floor_sizes}
    for n, fid in floors.items():
        print(f"Real-vs-real FID floor at N={n}: {fid:.3f}")
    result = {**info, "fid_real_floor": floors}
    (evaluator_dir(cache_dir) / ACCURACY_NAME).write_text(json.dumps(result, indent=2) + "\n")
    return result


@hydra_app("evaluator")
def main(cfg: DictConfig) -> float:
    return train_evaluator(cfg)["test_accuracy"]


if __name__ == "__main__":
    main()
