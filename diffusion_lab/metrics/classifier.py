"""A small MNIST CNN whose penultimate layer is the feature space for FID/KID and whose logits measure
conditional accuracy.

Inception-v3 features are a poor fit for 28×28 grey digits (they need upsampling to 299² and were trained
on ImageNet), so, like most MNIST diffusion papers, we train a digit classifier once and cache it under
`<cache_dir>/evaluator/`. The checkpoint holds the weights and the test accuracy measured after training.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from torch import nn

from diffusion_lab.errors import DataError
from diffusion_lab.utils.images import to_model_range

CHECKPOINT_NAME = "classifier.pt"
ACCURACY_NAME = "classifier.json"


class EvaluatorMissingError(DataError):
    """The cached classifier does not exist yet."""


def evaluator_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / "evaluator"


# ---------------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class MNISTClassifier(nn.Module):
    """(B, 1, 28, 28) float in [-1, 1] → logits (B, 10); `features` is the penultimate layer (B, feature_dim).

    Sized for a shared 2-core CPU (~2.3M multiply-adds per image, channels_last for oneDNN's fast conv path):
    an epoch over MNIST's 60k images takes about half a minute.
    """

    def __init__(self, feature_dim: int = 128, width: int = 16, dropout: float = 0.3):
        super().__init__()
        self.feature_dim = feature_dim
        # Channels double as resolution halves; the 28×28 stage is kept narrow because its activations,
        # not its multiply-adds, dominate CPU time (BatchNorm/ReLU are memory-bound).
        self.body = nn.Sequential(
            _conv(1, width), nn.MaxPool2d(2),  # (B, w, 14, 14)
            _conv(width, 2 * width), nn.MaxPool2d(2),  # (B, 2w, 7, 7)
            _conv(2 * width, 4 * width), nn.Flatten(),  # (B, 4w·49)
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Linear(4 * width * 49, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, 10))
        self.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [-1, 1] (or uint8) → (B, feature_dim) post-ReLU penultimate activations."""
        return self.fc(self.body(to_model_range(x).contiguous(memory_format=torch.channels_last)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------------------
# Training, evaluation, caching
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels (N,) for uint8 or [-1, 1] images, in eval mode."""
    was_training = model.training
    model.eval()
    preds = torch.cat(
        [model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
    )
    model.train(was_training)
    return preds


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ±max_shift pixels (one shift per batch quarter): cheap augmentation
    that makes the features less sensitive to the small offsets generated digits often have."""
    out = []
    for chunk in x.chunk(4):
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
        out.append(torch.roll(chunk, shifts=(dy, dx), dims=(2, 3)))
    return torch.cat(out)


def _train_epoch(
    model: MNISTClassifier,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    max_shift: int,
    gen: torch.Generator,
    bar: Progress,
    task: TaskID,
) -> float:
    """One pass over a `gen`-seeded permutation of the training set; returns the last batch's loss."""
    order = torch.randperm(len(labels), generator=gen)
    for step in range(math.ceil(len(labels) / batch_size)):
        idx = order[step * batch_size : (step + 1) * batch_size]
        x = to_model_range(images[idx])
        loss = F.cross_entropy(model(_shift(x, max_shift, gen) if max_shift else x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(task, advance=1, loss=f"{loss.item():.3f}")
    return loss.item()


def train_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 2,
    feature_dim: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> tuple[MNISTClassifier, dict]:
    """Train on uint8 (N, 1, 28, 28) images with AdamW + OneCycle; return (model in eval mode, info) with
    info = {"test_accuracy", "epoch_accuracy" (test accuracy after each epoch), "train_seconds", ...}.
    With `progress`, a bar and a line per epoch with its test accuracy (the line also where the
    output is not a terminal, as in a log file, where the bar stays silent)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MNISTClassifier(feature_dim=feature_dim)
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    model.train()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("loss {task.fields[loss]}"))  # fmt: skip
    epoch_accuracy = []
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("classifier", total=epochs * steps_per_epoch, loss="-")
        for epoch in range(epochs):
            bar.update(task, description=f"classifier epoch {epoch + 1}/{epochs}")
            loss = _train_epoch(
                model, opt, sched, train_images, train_labels, batch_size, max_shift, gen, bar, task
            )
            epoch_accuracy.append((predict(model, test_images) == test_labels).float().mean().item())
            if progress:
                bar.console.print(
                    f"classifier epoch {epoch + 1}/{epochs}: test accuracy {epoch_accuracy[-1]:.4f}, "
                    f"loss {loss:.3f}, {time.perf_counter() - start:.0f} s"
                )
    model.eval()
    info = {
        "test_accuracy": epoch_accuracy[-1],
        "epoch_accuracy": epoch_accuracy,
        "train_seconds": time.perf_counter() - start,
        "epochs": epochs,
        "feature_dim": feature_dim,
        "seed": seed,
        "num_train": len(train_labels),
        "num_test": len(test_labels),
    }
    return model, info


def save_classifier(model: MNISTClassifier, info: dict, cache_dir: str | Path) -> Path:
    """Write weights + info to `<cache_dir>/evaluator/classifier.pt` and info to `classifier.json`."""
    folder = evaluator_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_NAME
    torch.save({"state_dict": model.state_dict(), "info": info}, path)
    (folder / ACCURACY_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return path


def load_classifier(cache_dir: str | Path, return_info: bool = False):
    """The cached classifier in eval mode (and its info dict when `return_info`)."""
    path = evaluator_dir(cache_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise EvaluatorMissingError(
            f"No trained MNIST evaluator at {path}. Train it once with `dlab-train-evaluator` "
            f"(it writes to paths.cache_dir/evaluator; set DLAB_CACHE_DIR or paths.cache_dir=... to match)."
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = MNISTClassifier(feature_dim=ckpt["info"]["feature_dim"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return (model, ckpt["info"]) if return_info else model
