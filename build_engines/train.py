"""Training of one model on a set of patients, with early stopping on held-out patients.

Compute plan for a 2-core CPU (no bf16 units: autocast was 10x slower here):
balanced epochs of a few hundred sampled slices, progressive resizing (cheap
low-resolution epochs first, the serving size last, so batch-norm statistics
match what serving sees), channels-last tensors. Early stopping watches the
loss on patients held out from the training folds, never the outer fold.

    result = train_model(spec, dataset, train_idx, stop_idx, TrainConfig())
    probabilities = predict_views(result.model, dataset.views[test_idx], spec)
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from build_engines.augment import augment_batch, resize_batch
from build_engines.data import Dataset
from client.preprocess import normalize
from client.registry import ModelSpec
from client.torch_models import build_model

logger = logging.getLogger(__name__)

#: Share of sampled slices per (source, label) cell: trauma data (ct_ich_dev)
#: is what an ER sees most and is weighted up; classes end up 50/50.
CELL_WEIGHTS = {
    ("kaggle_head_ct", 0): 0.12,
    ("kaggle_head_ct", 1): 0.12,
    ("phe_sich", 0): 0.16,
    ("phe_sich", 1): 0.16,
    ("ct_ich_dev", 0): 0.22,
    ("ct_ich_dev", 1): 0.22,
}


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; the defaults are what `make train` uses."""

    sizes: tuple[int, ...] = (128, 128, 160, 192, 224, 224)
    samples_per_epoch: int = 512
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    patience: int = 3
    seed: int = 0
    pretrained: bool = False

    def truncated(self, epochs: int) -> TrainConfig:
        """The same schedule cut to ``epochs`` epochs, ending at the serving size."""
        sizes = self.sizes[:epochs]
        return TrainConfig(**{**asdict(self), "sizes": (*sizes[:-1], self.sizes[-1])})


@dataclass
class TrainResult:
    """A trained model (best early-stopping epoch) and its learning curves."""

    model: torch.nn.Module
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def sample_weights(dataset: Dataset, indices: np.ndarray) -> np.ndarray:
    """Sampling probability of each index so every (source, label) cell gets its share."""
    cells = [(dataset.records[i].source, dataset.records[i].label) for i in indices]
    counts: dict[tuple[str, int], int] = {}
    for cell in cells:
        counts[cell] = counts.get(cell, 0) + 1
    weights = np.array([CELL_WEIGHTS[c] / counts[c] for c in cells])
    return weights / weights.sum()


def new_model(spec: ModelSpec, config: TrainConfig) -> torch.nn.Module:
    """A fresh model, from the dequantized ImageNet MobileNetV2 when asked."""
    model = build_model(spec)
    if config.pretrained:
        from build_engines.pretrained import load_imagenet_mobilenet_v2

        load_imagenet_mobilenet_v2(model)
    return model


def train_model(
    spec: ModelSpec,
    dataset: Dataset,
    train_idx: np.ndarray,
    stop_idx: np.ndarray | None,
    config: TrainConfig,
    desc: str = "train",
) -> TrainResult:
    """Train on ``train_idx``; early-stop on ``stop_idx`` (None: run the whole schedule)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = new_model(spec, config).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = config.samples_per_epoch // config.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=steps_per_epoch * len(config.sizes), pct_start=0.2
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    probabilities = sample_weights(dataset, train_idx)
    labels = dataset.labels
    best = TrainResult(copy.deepcopy(model), 0)
    best_loss, history = float("inf"), []
    for epoch, size in enumerate(config.sizes, start=1):
        model.train()
        chosen = rng.choice(train_idx, size=steps_per_epoch * config.batch_size, p=probabilities)
        losses, correct = [], 0
        for batch in tqdm(
            chosen.reshape(steps_per_epoch, -1), desc=f"{desc} e{epoch}@{size}", leave=False
        ):
            x = torch.from_numpy(normalize(augment_batch(dataset.views[batch], rng, size), spec))
            x = x.to(memory_format=torch.channels_last)
            y = torch.from_numpy(labels[batch])
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            correct += int((logits.argmax(1) == y).sum())
        record = {
            "epoch": epoch,
            "size": size,
            "train_loss": float(np.mean(losses)),
            "train_acc": correct / len(chosen),
        }
        if stop_idx is not None:
            p = predict_views(model, dataset.views[stop_idx], spec)
            y_stop = labels[stop_idx]
            eps = 1e-6
            record.update(
                val_loss=float(
                    -np.mean(y_stop * np.log(p + eps) + (1 - y_stop) * np.log(1 - p + eps))
                ),
                val_acc=float(np.mean((p >= 0.5) == y_stop)),
                val_auc=float(roc_auc_score(y_stop, p)) if len(set(y_stop)) == 2 else float("nan"),
            )
            if record["val_loss"] < best_loss:
                best_loss = record["val_loss"]
                best = TrainResult(copy.deepcopy(model), epoch)
        history.append(record)
        logger.info("%s %s", desc, record)
        if stop_idx is not None and epoch - best.best_epoch >= config.patience:
            break
    if stop_idx is None:
        best = TrainResult(model, len(config.sizes))
    best.history = history
    best.model.eval()
    return best


def predict_views(
    model: torch.nn.Module, views: np.ndarray, spec: ModelSpec, batch_size: int = 64
) -> np.ndarray:
    """P(hemorrhage) for cached uint8 views at the serving size."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(views), batch_size):
            x = torch.from_numpy(
                normalize(resize_batch(views[start : start + batch_size], spec.input_size), spec)
            )
            logits = model(x.to(memory_format=torch.channels_last))
            out.append(torch.softmax(logits, 1)[:, 1].numpy())
    return np.concatenate(out) if out else np.empty(0)
