"""ClassEncoder: Condition shapes, CFG dropout to a learned null, balanced default labels, label checks."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.nets.encoders import ClassEncoder
from tests.nets.encoders.common import assert_same_condition

LABELS = torch.tensor([0, 3, 9, 3])


def test_class_encoder_condition_shapes():
    enc = ClassEncoder(num_classes=10, dim=16).eval()
    c = enc(LABELS)
    assert enc.dim == 16 and enc.input_key == "label"
    assert c.tokens.shape == (4, 1, 16) and c.pooled.shape == (4, 16) and c.mask.shape == (4, 1)
    assert c.mask.dtype == torch.bool and c.mask.all()
    assert torch.equal(c.tokens[:, 0], c.pooled)
    assert torch.equal(c.pooled[1], c.pooled[3]) and not torch.equal(c.pooled[0], c.pooled[1])


def test_class_encoder_drop_prob_one_gives_exactly_the_null_in_train_mode():
    enc = ClassEncoder(dim=16, drop_prob=1.0).train()
    null = enc.null(4, "cpu")
    assert_same_condition(enc(LABELS), null)
    assert torch.equal(null.pooled[0], enc.embedding.weight[10])  # the learned row at index num_classes
    assert not any(torch.equal(null.pooled[0], enc.embedding.weight[i]) for i in range(10))


def test_class_encoder_eval_mode_never_drops():
    enc = ClassEncoder(dim=16, drop_prob=1.0).eval()
    assert torch.equal(enc(LABELS).pooled, enc.embedding.weight[LABELS])


def test_class_encoder_drops_at_drop_prob_with_the_global_rng():
    enc = ClassEncoder(dim=8, drop_prob=0.3).train()
    labels = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    dropped = ~(enc(labels).pooled == enc.embedding.weight[0]).all(-1)
    assert 0.27 < dropped.float().mean() < 0.33
    torch.manual_seed(0)
    assert torch.equal(dropped, ~(enc(labels).pooled == enc.embedding.weight[0]).all(-1))  # reproducible


def test_class_encoder_force_drop_and_null_are_learned():
    enc = ClassEncoder(dim=8, drop_prob=0.0).eval()
    c = enc(LABELS, force_drop=torch.tensor([True, False, False, True]))
    null = enc.null(1).pooled[0]
    assert torch.equal(c.pooled[0], null) and torch.equal(c.pooled[3], null)
    assert torch.equal(c.pooled[1], enc.embedding.weight[3])
    c.pooled.sum().backward()
    assert enc.embedding.weight.grad[10].abs().sum() > 0  # CFG's null token trains


def test_class_encoder_default_inputs_are_balanced():
    enc = ClassEncoder(num_classes=10, dim=8)
    assert enc.default_inputs().tolist() == list(range(10))  # one of each (sample grid rows)
    assert enc.default_inputs(12).tolist() == [*range(10), 0, 1]


@pytest.mark.parametrize("bad", [[0, 10], [-1, 2]])
def test_class_encoder_rejects_labels_out_of_range(bad):
    with pytest.raises(ConfigError, match=r"the classes 0\.\.9"):
        ClassEncoder(num_classes=10, dim=8)(torch.tensor(bad))
