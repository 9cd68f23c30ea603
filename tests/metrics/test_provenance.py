"""The provenance beside every dlab-eval score: the extractor's hash, NFE, EMA, code version, and which
records may share a column. Tiny random evaluators, no training."""

from __future__ import annotations

import copy
import hashlib
import subprocess

import pytest
import torch
from torch import nn

import diffusion_lab
from diffusion_lab.metrics import provenance as prov
from diffusion_lab.metrics.classifier import MNISTClassifier
from diffusion_lab.metrics.fid import MNISTEvaluator


def tiny_evaluator(seed: int = 0, reference: dict | None = None) -> MNISTEvaluator:
    """A random classifier (built from `seed`) scoring against 40 random 'real' images."""
    torch.manual_seed(seed)
    classifier = MNISTClassifier(feature_dim=8, width=2)
    images = torch.randint(
        0, 256, (40, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    return MNISTEvaluator(classifier, images, torch.arange(40) % 10, images[:30], reference=reference)


# ---------------------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------------------


def test_state_dict_hash_is_the_documented_sha256_in_key_order():
    """Restated by hand: `key dtype shape\\n` then the tensor's bytes, key after key."""
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(6.0).reshape(3, 2))
        layer.bias.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    expected = hashlib.sha256()
    expected.update(b"weight torch.float32 (3, 2)\n")
    expected.update(torch.arange(6.0).numpy().tobytes())
    expected.update(b"bias torch.float32 (3,)\n")
    expected.update(torch.tensor([-1.0, 0.5, 2.0]).numpy().tobytes())
    assert prov.state_dict_sha256(layer.state_dict()) == expected.hexdigest()
    # A transposed (non-contiguous) view hashes its values in C order, as a contiguous copy does.
    assert prov.digest([layer.weight.t()]) == prov.digest([layer.weight.t().contiguous()])


def test_extractor_hash_is_stable_and_changes_with_one_weight():
    first, second = tiny_evaluator(), tiny_evaluator()  # built separately from the same seed
    assert first.classifier is not second.classifier
    identity = prov.extractor_identity(first)
    assert identity == prov.extractor_identity(second)
    assert identity["name"] == "MNISTClassifier" and identity["feature_dim"] == 8
    assert len(identity["sha256"]) == 64
    changed = copy.deepcopy(second.classifier)
    with torch.no_grad():
        changed.head[1].bias[3] += 1e-6  # one weight of one layer
    assert prov.state_dict_sha256(changed.state_dict()) != identity["sha256"]
    assert prov.extractor_identity(tiny_evaluator(seed=1))["sha256"] != identity["sha256"]


def test_reference_identity_names_the_set_its_size_hash_and_floor():
    evaluator = tiny_evaluator(reference={"name": "digits", "split": "test"})
    images = torch.randint(
        0, 256, (40, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    reference = prov.reference_identity(evaluator, 16)
    floor, floor_n = evaluator.fid_real_floor(16)
    assert reference == {
        "name": "digits", "split": "test", "size": 40, "sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
        "floor_against": "holdout", "holdout_size": 30, "fid_real_floor": floor, "fid_real_floor_n": 16,
    }  # fmt: skip
    assert floor_n == 16 and floor > 0


# ---------------------------------------------------------------------------------------------------------
# NFE
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, steps, kind, scale, expected",
    [
        ("DDIMSampler", 20, "none", 1.0, 20),
        ("DDIMSampler", 20, "cfg", 1.0, 20),  # s = 1: the conditional pass alone
        ("DDIMSampler", 20, "cfg", 0.0, 20),  # s = 0: the null pass alone
        ("DDIMSampler", 20, "cfg", 1.6, 40),  # CFG doubles
        ("DPMSolverPP2MSampler", 15, "none", 2.0, 15),
        ("DPMSolverPP2MSampler", 15, "cfg", 2.0, 30),
        ("dpmpp", 15, "autoguidance", 2.0, 30),  # the model + the weaker one
        ("dpmpp", 15, "autoguidance", 1.0, 15),
        ("HeunSampler", 18, "none", 1.0, 35),  # 2 per step, the last (to σ = 0) Euler alone
        ("heun", 18, "cfg", 2.0, 70),
        ("ddim", 10, "cfg", {"sketch": 1.5, "text": 3.0}, 30),  # per-condition: 1 + one pass per scale
    ],
)
def test_nfe(sampler, steps, kind, scale, expected):
    assert prov.nfe(sampler, steps, kind, scale) == expected


def test_nfe_with_a_guidance_interval_guides_only_some_calls():
    assert prov.nfe("ddim", 20, "cfg", 2.0, guided_calls=5) == 25  # 15 unguided calls + 5 guided × 2
    assert prov.nfe("anything", 20, "cfg", 2.0, calls=39, guided_calls=0) == 39
    with pytest.raises(ValueError, match="guidance kind 'classifier'"):
        prov.guidance_passes("classifier", 2.0)


# ---------------------------------------------------------------------------------------------------------
# EMA, checkpoint, code version
# ---------------------------------------------------------------------------------------------------------


def test_ema_record():
    run_config = {"callbacks": {"ema": {"_target_": "diffusion_lab.callbacks.ema.WarmupEMA", "decay": 0.999}}}
    assert prov.ema_record(run_config) == {"kind": "ema", "decay": 0.999}
    assert prov.ema_record(run_config, sigma_rel=0.1) == {"kind": "post_hoc", "sigma_rel": 0.1}
    assert prov.ema_record({"callbacks": {"ema": None}}) == {"kind": "none"}
    assert prov.ema_record(None) == {"kind": "none"}


def test_checkpoint_record_names_the_run_folder(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert prov.checkpoint_record(path, 2300) == {
        "path": str(path),
        "step": 2300,
        "run": str(tmp_path / "run"),
    }


def test_code_version_outside_git_is_null(tmp_path):
    assert prov.code_version(tmp_path) == {
        "version": diffusion_lab.__version__,
        "commit": None,
        "dirty": None,
    }
    inner = tmp_path / "pkg"
    inner.mkdir()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    # A package folder inside someone else's repository is not the package's own checkout.
    assert prov.code_version(inner)["commit"] is None


def test_code_version_of_this_checkout():
    version = prov.code_version()
    head = subprocess.run(["git", "-C", str(prov.Path(diffusion_lab.__file__).parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    assert version["commit"] == (head or None)
    assert version["dirty"] in ((True, False) if head else (None,))


# ---------------------------------------------------------------------------------------------------------
# Which records can share a column
# ---------------------------------------------------------------------------------------------------------


def record(**changes) -> dict:
    """A provenance record; `changes` maps "part.key" to a new value."""
    base = {
        "extractor": {"name": "MNISTClassifier", "feature_dim": 128, "sha256": "ab12" + "0" * 60},
        "reference": {"name": "mnist", "split": "test", "size": 10000, "sha256": "cd34" + "1" * 60},
    }
    for dotted, value in changes.items():
        part, key = dotted.split(".")
        base[part][key] = value
    return prov.provenance(n=5000, seed=0, batch_size=500, sampler={}, guidance={}, ema={}, checkpoint={},
                           code={}, **base)  # fmt: skip


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"extractor.sha256": "9f3c" + "2" * 60}, "0 and 2: extractor sha256 ab120000… vs 9f3c2222…"),
        ({"extractor.name": "InceptionV3"}, "0 and 2: extractor name MNISTClassifier vs InceptionV3"),
        ({"extractor.feature_dim": 2048}, "0 and 2: extractor feature_dim 128 vs 2048"),
        ({"reference.name": "fashion"}, "0 and 2: reference name mnist vs fashion"),
        ({"reference.split": "train"}, "0 and 2: reference split test vs train"),
        ({"reference.size": 5000}, "0 and 2: reference size 10000 vs 5000"),
        ({"reference.sha256": "ee" * 32}, "0 and 2: reference sha256 cd341111… vs eeeeeeee…"),
    ],
)
def test_comparable_names_the_first_difference(changes, reason):
    assert prov.comparable({"0": record(), "1": record(), "2": record(**changes), "3": record()}) == reason


def test_comparable_records():
    assert prov.comparable({"0": record(), "1": record()}) is None
    assert prov.comparable({"0": record(**{"reference.holdout_size": 5})}) is None  # not part of the identity
    assert prov.comparable({}) is None
    assert prov.comparable({"a": None, "b": None}) is None  # old eval.json files: nothing to tell apart
    assert (
        prov.comparable({"a": record(), "b": None})
        == "a and b: extractor name MNISTClassifier vs none recorded"
    )
