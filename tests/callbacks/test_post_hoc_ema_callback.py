"""PostHocEMA in a real Lightning loop on a two-weight model: its averages are the power-function EMA of the
weights after each optimizer step, its snapshots hold them, and a resumed run continues bit for bit."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from diffusion_lab.callbacks.post_hoc_ema import PostHocEMA, averaged_names
from diffusion_lab.errors import ConfigError
from diffusion_lab.utils.post_hoc_ema import load_snapshots, sigma_rel_to_gamma


class Walker(L.LightningModule):
    """Weights pulled each step towards a target that depends only on the step, so a resumed run takes the
    same steps whatever batch it sees; `seen` records the weights after each optimizer step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("table", torch.arange(3.0))
        self.seen: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        target = torch.tensor([1.0, 2.0]) * (self.global_step + 1) ** 0.5
        return ((self.w - target) ** 2).sum() + 0 * batch.sum()

    def on_train_batch_end(self, *args):
        self.seen[self.global_step] = self.w.detach().clone()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(100, 1), batch_size=1)


def _fit(tmp_path, name, max_steps, ckpt_path=None, **callback):
    model, ema = Walker(), PostHocEMA(dirpath=str(tmp_path / name), **({"every_n_steps": 2} | callback))
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=[ema], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, ema, trainer


def test_averages_are_the_power_function_ema_and_snapshots_hold_them(tmp_path):
    model, ema, _ = _fit(tmp_path, "run", 5)
    assert averaged_names(model) == ["w"]  # not the frozen weight, not the buffer
    assert ema.step == 5
    for sigma_rel, average in zip((0.05, 0.10), ema.averages, strict=True):
        g = sigma_rel_to_gamma(sigma_rel)
        # After step t, θ_i weighs (i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1).
        exact = sum(
            (i ** (g + 1) - (i - 1) ** (g + 1)) * model.seen[i].double() for i in range(1, 6)
        ) / 5 ** (g + 1)
        torch.testing.assert_close(average["w"].double(), exact, rtol=1e-6, atol=0)
    snapshots = load_snapshots(tmp_path / "run")
    assert [s["step"] for s in snapshots] == [2, 4, 5]  # every 2 steps, and the last one at the end
    assert snapshots[-1]["sigma_rels"] == [0.05, 0.10]
    assert snapshots[-1]["gammas"] == [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    for saved, average in zip(snapshots[-1]["averages"], ema.averages, strict=True):
        assert saved["w"].dtype == torch.float32
        assert torch.equal(saved["w"], average["w"])
        assert saved.keys() == {"w"}
    # The averages of a step are saved once, and the last snapshot's come from the last step.
    assert snapshots[0]["averages"][0]["w"].tolist() != snapshots[1]["averages"][0]["w"].tolist()
    _, half, _ = _fit(tmp_path, "half", 2, dtype="float16")
    (snapshot,) = load_snapshots(tmp_path / "half")
    assert torch.equal(snapshot["averages"][1]["w"], half.averages[1]["w"].half())
    assert half.averages[1]["w"].dtype == torch.float32  # the averages themselves stay full precision


def test_a_resumed_run_continues_the_averages_and_snapshots_exactly(tmp_path):
    _, straight, _ = _fit(tmp_path, "straight", 6)
    _, _, first = _fit(tmp_path, "resumed", 3)
    first.save_checkpoint(tmp_path / "step3.ckpt")
    state = torch.load(tmp_path / "step3.ckpt", weights_only=False)["callbacks"]["PostHocEMA"]
    assert state["step"] == 3 and state["averages"][0]["w"].dtype == torch.float32  # full precision to resume
    _, resumed, _ = _fit(tmp_path, "resumed", 6, ckpt_path=tmp_path / "step3.ckpt")
    assert resumed.step == straight.step == 6
    for a, b in zip(straight.averages, resumed.averages, strict=True):
        assert torch.equal(a["w"], b["w"])
    a, b = load_snapshots(tmp_path / "straight"), load_snapshots(tmp_path / "resumed")
    assert [s["step"] for s in a] == [2, 4, 6]
    assert [s["step"] for s in b] == [2, 3, 4, 6]  # the first part's end saved step 3: one more to use
    for x, y in zip(a, [s for s in b if s["step"] != 3], strict=True):
        for p, q in zip(x["averages"], y["averages"], strict=True):
            assert torch.equal(p["w"], q["w"])

    with pytest.raises(
        ConfigError, match=r"sigma_rels=\[0.05, 0.2\]: the run being resumed kept \[0.05, 0.1\]"
    ):
        _fit(tmp_path, "other", 6, ckpt_path=tmp_path / "step3.ckpt", sigma_rels=(0.05, 0.2))


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="every_n_steps=0"):
        PostHocEMA(dirpath="x", every_n_steps=0)
    with pytest.raises(ConfigError, match="sigma_rel=0.5"):
        PostHocEMA(dirpath="x", sigma_rels=(0.05, 0.5))
    with pytest.raises(ConfigError, match="dtype='bfloat16': expected float32 or float16"):
        PostHocEMA(dirpath="x", dtype="bfloat16")
