"""Training of one model on a set of patients, with early stopping on held-out patients.

Compute plan for a 2-core CPU (no bf16 units: autocast was 10x slower here):
balanced epochs of a few hundred sampled slices, most epochs at 128 px (about
3x cheaper than 224), then a short fine-tune at the serving size so filters
and batch-norm statistics match what serving sees; channels-last tensors. Early stopping watches
patients held out from the training folds, never the outer fold.

    result = train_model(spec, dataset, train_idx, stop_idx, TrainConfig())
    probabilities = predict_views(result.model, dataset.views[test_idx], spec)
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from build_engines.augment import augment_batch, resize_batch
from build_engines.data import CONTEXTS, SAMPLINGS, SCALPS, Dataset
from client.preprocess import normalize
from client.registry import ModelSpec
from client.torch_models import SliceNet, build_model

logger = logging.getLogger(__name__)

#: Which epoch of the low-resolution phase a model keeps: the one with the
#: ``lowest_loss`` on the held-out patients (early stopping), or the ``last``
#: of the full schedule (held-out scores are only recorded). A model trained
#: from scratch swings in calibration from epoch to epoch while the learning
#: rate is high, so its held-out loss picks a snapshot at random; the last
#: epoch is where the one-cycle rate has annealed, the same point in every fold.
KEEP_EPOCHS = ("lowest_loss", "last")

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
    """Hyper-parameters; the defaults are what `make train` uses.

    Training has two phases. The low-resolution phase (``low_res`` px, up to
    ``epochs`` epochs, early-stopped) does most of the learning at a third of
    the cost; the fine-tune phase (``finetune_epochs`` at the serving size, low
    learning rate, from the best low-resolution checkpoint) adapts the
    filters and batch-norm statistics to what serving feeds the model.

    With a teacher, ``distill_weight`` of the loss is the teacher's softened
    prediction on the same augmented view (Hinton et al. 2015, temperature
    ``distill_temperature``), the rest the labels: no ImageNet ResNet weights
    exist offline, and our MobileNetV2 teacher carries ImageNet features.

    ``context`` is what the model sees of a slice (:data:`build_engines.data.CONTEXTS`):
    ``2d`` the slice alone, ``2.5d`` the slice between its series neighbours.
    ``scalp`` (:data:`build_engines.data.SCALPS`) is whether the views keep
    what lies outside the skull. Both are part of the run's key and of the
    weights sidecar, because a model trained on one cannot be fed the other.
    ``sampling`` (:data:`build_engines.data.SAMPLINGS`) is what is drawn
    equally often inside a (source, label) cell: each ``slice``, or each
    ``patient`` (a bleed seen on 2 slices as often as one seen on 20).
    ``keep`` (:data:`KEEP_EPOCHS`) is which low-resolution epoch is kept.
    """

    epochs: int = 12
    low_res: int = 128
    finetune_epochs: int = 1
    samples_per_epoch: int = 1280
    batch_size: int = 32
    lr: float = 2e-3
    finetune_lr_factor: float = 0.1
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    patience: int = 4
    seed: int = 0
    pretrained: bool = False
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    hard_negative_boost: float = 0.0
    context: str = "2d"
    scalp: str = "keep"
    sampling: str = "slice"
    keep: str = "lowest_loss"

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {self.context!r}")
        if self.scalp not in SCALPS:
            raise ValueError(f"scalp must be one of {', '.join(SCALPS)}, got {self.scalp!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(
                f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}"
            )
        if self.keep not in KEEP_EPOCHS:
            raise ValueError(f"keep must be one of {', '.join(KEEP_EPOCHS)}, got {self.keep!r}")


@dataclass
class TrainResult:
    """A trained model and its learning curves (one record per epoch)."""

    model: torch.nn.Module
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def sample_weights(
    dataset: Dataset,
    indices: np.ndarray,
    hard_negative_boost: float = 0.0,
    sampling: str = "slice",
) -> np.ndarray:
    """Sampling probability of each index so every (source, label) cell gets its share.

    With ``sampling="patient"`` each patient of a cell is drawn equally often,
    however many of its slices the cell holds: small bleeds, seen on one or two
    slices, are otherwise outweighed by large ones. With ``hard_negative_boost``
    and a dataset ``difficulty``, a normal slice is drawn ``1 + boost x
    difficulty`` times as often as an easy one of its cell or patient (the
    cell's share stays the same): the false alarms an earlier model made (busy
    mid-brain slices, round heads, fractures) are seen more often.
    """
    cells = [(dataset.records[i].source, dataset.records[i].label) for i in indices]
    within = np.ones(len(indices))
    if sampling == "patient":
        groups = [
            (cell, dataset.records[i].patient) for cell, i in zip(cells, indices, strict=True)
        ]
        sizes = Counter(groups)
        within /= np.array([sizes[g] for g in groups], dtype=float)
    if hard_negative_boost and dataset.difficulty is not None:
        normal = np.array([label == 0 for _, label in cells])
        within[normal] *= 1 + hard_negative_boost * dataset.difficulty[indices][normal]
    totals: dict[tuple[str, int], float] = {}
    for cell, w in zip(cells, within, strict=True):
        totals[cell] = totals.get(cell, 0.0) + w
    weights = np.array(
        [CELL_WEIGHTS[c] * w / totals[c] for c, w in zip(cells, within, strict=True)]
    )
    return weights / weights.sum()


def new_model(spec: ModelSpec, config: TrainConfig, calibration: np.ndarray) -> torch.nn.Module:
    """A fresh model, from the dequantized ImageNet MobileNetV2 when asked.

    ``calibration`` (uint8 inputs of training slices) sets the pretrained
    model's batch-norm statistics, so training starts from the ImageNet function.
    """
    model = build_model(spec)
    if config.pretrained:
        from build_engines.pretrained import calibrate_batch_norm, load_imagenet_mobilenet_v2

        load_imagenet_mobilenet_v2(model)
        views = resize_batch(calibration, config.low_res)
        calibrate_batch_norm(model, torch.from_numpy(normalize(views, spec)))
    return model


class _EpochRunner:
    """Runs sampled, augmented epochs of one model and scores held-out patients."""

    def __init__(
        self,
        spec: ModelSpec,
        dataset: Dataset,
        train_idx: np.ndarray,
        config: TrainConfig,
        teacher: torch.nn.Module | None = None,
    ):
        self.spec, self.dataset, self.train_idx, self.config = spec, dataset, train_idx, config
        self.teacher = None if teacher is None else teacher.to(_device()).eval()
        self.rng = np.random.default_rng(config.seed)
        self.probabilities = sample_weights(
            dataset, train_idx, config.hard_negative_boost, config.sampling
        )
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.steps = config.samples_per_epoch // config.batch_size

    def train_epoch(self, model, optimizer, scheduler, size: int, desc: str) -> dict:
        model.train()
        labels = self.dataset.labels
        chosen = self.rng.choice(
            self.train_idx, size=self.steps * self.config.batch_size, p=self.probabilities
        )
        losses, correct = [], 0
        for batch in tqdm(chosen.reshape(self.steps, -1), desc=desc, leave=False):
            views = augment_batch(self.dataset.inputs(batch, self.config.context), self.rng, size)
            x = torch.from_numpy(normalize(views, self.spec)).to(
                _device(), memory_format=torch.channels_last
            )
            y = torch.from_numpy(labels[batch]).to(_device())
            logits = model(x)
            loss = self.loss_fn(logits, y)
            if self.teacher is not None:
                loss = self._distill(loss, logits, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
            correct += int((logits.argmax(1) == y).sum())
        return {
            "size": size,
            "train_loss": float(np.mean(losses)),
            "train_acc": correct / len(chosen),
        }

    def _distill(self, label_loss, logits, x):
        """Mix the label loss with the KL divergence from the teacher's softened output."""
        t, weight = self.config.distill_temperature, self.config.distill_weight
        with torch.no_grad():
            target = torch.softmax(self.teacher(x) / t, dim=1)
        soft = torch.nn.functional.kl_div(
            torch.log_softmax(logits / t, dim=1), target, reduction="batchmean"
        )
        return (1 - weight) * label_loss + weight * t * t * soft

    def validate(self, model, stop_idx: np.ndarray, size: int) -> dict:
        p = predict_views(
            model, self.dataset.inputs(stop_idx, self.config.context), self.spec, size=size
        )
        y = self.dataset.labels[stop_idx]
        eps = 1e-6
        return {
            "val_loss": float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))),
            "val_acc": float(np.mean((p >= 0.5) == y)),
            "val_auc": float(roc_auc_score(y, p)) if len(set(y)) == 2 else float("nan"),
        }


def train_model(
    spec: ModelSpec,
    dataset: Dataset,
    train_idx: np.ndarray,
    stop_idx: np.ndarray | None,
    config: TrainConfig,
    desc: str = "train",
    teacher: torch.nn.Module | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train on ``train_idx``; keep an epoch by ``config.keep`` or stop after ``stop_after``.

    ``stop_idx`` patients are scored after every epoch; with ``keep="lowest_loss"``
    they also early-stop training.

    The learning-rate schedule always spans ``config.epochs``: a final model
    stopped after the folds' median best epoch is at the learning rate the fold
    models were kept at, the closest it can come to the models whose
    out-of-fold scores chose its thresholds (the model card checks how close:
    ``_served_weights_limits``). ``teacher`` (a trained model of the same
    input size and normalization) is distilled with ``config.distill_weight``.
    """
    torch.manual_seed(config.seed)
    runner = _EpochRunner(spec, dataset, train_idx, config, teacher)
    calibration = dataset.inputs(
        runner.rng.choice(train_idx, size=64, p=runner.probabilities), config.context
    )
    model = new_model(spec, config, calibration).to(_device(), memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=runner.steps * config.epochs, pct_start=0.2
    )
    history: list[dict] = []
    early_stopping = stop_idx is not None and config.keep == "lowest_loss"
    best_state, best_epoch, best_loss = copy.deepcopy(model.state_dict()), 0, float("inf")
    for epoch in range(1, (stop_after or config.epochs) + 1):
        record = {"epoch": epoch}
        record |= runner.train_epoch(
            model, optimizer, scheduler, config.low_res, f"{desc} e{epoch}"
        )
        if stop_idx is not None:
            record |= runner.validate(model, stop_idx, config.low_res)
        if early_stopping and record["val_loss"] < best_loss:
            best_state, best_epoch, best_loss = (
                copy.deepcopy(model.state_dict()),
                epoch,
                record["val_loss"],
            )
        history.append(record)
        logger.info("%s %s", desc, record)
        if early_stopping and epoch - best_epoch >= config.patience:
            break
    if early_stopping:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)

    finetune = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr * config.finetune_lr_factor,
        weight_decay=config.weight_decay,
    )
    for step in range(1, config.finetune_epochs + 1):
        epoch = len(history) + 1
        record = {"epoch": epoch, "finetune": True}
        record |= runner.train_epoch(
            model, finetune, None, spec.input_size, f"{desc} fine-tune {step}"
        )
        if stop_idx is not None:
            record |= runner.validate(model, stop_idx, spec.input_size)
        history.append(record)
        logger.info("%s %s", desc, record)
    return TrainResult(model.cpu().eval(), best_epoch, history)


def _device() -> torch.device:
    """CUDA when present (a lent GPU trains the same code in minutes), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def predict_views(
    model: torch.nn.Module,
    views: np.ndarray,
    spec: ModelSpec,
    size: int | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """P(hemorrhage) for cached uint8 views, at the serving size unless ``size`` is given.

    ``views`` are (N, S, S) single views or (N, 3, S, S) 2.5D inputs
    (:meth:`build_engines.data.Dataset.inputs`).
    """
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(views), batch_size):
            x = torch.from_numpy(
                normalize(
                    resize_batch(views[start : start + batch_size], size or spec.input_size), spec
                )
            )
            device = next(model.parameters()).device
            logits = model(x.to(device, memory_format=torch.channels_last))
            out.append(torch.softmax(logits.float(), 1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.empty(0)


def embed_views(
    model: torch.nn.Module,
    views: np.ndarray,
    spec: ModelSpec,
    augmented: int,
    seed: int,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """P(hemorrhage) and pooled embeddings of the plain view and ``augmented`` random views.

    Returns:
        Probabilities (1 + augmented, N) and embeddings (1 + augmented, N, D),
        the plain view first; at the serving size.
    """
    net = SliceNet(copy.deepcopy(model), spec.arch).eval()
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    probabilities, embeddings = [], []
    for view in range(1 + augmented):
        p_out, e_out = [], []
        with torch.inference_mode():
            for start in range(0, len(views), batch_size):
                chunk = views[start : start + batch_size]
                images = (
                    resize_batch(chunk, spec.input_size)
                    if view == 0
                    else augment_batch(chunk, rng, spec.input_size)
                )
                x = torch.from_numpy(normalize(images, spec))
                p, e = net(x.to(device, memory_format=torch.channels_last))
                p_out.append(p[:, 1].float().cpu().numpy())
                e_out.append(e.float().cpu().numpy())
        probabilities.append(np.concatenate(p_out))
        embeddings.append(np.concatenate(e_out))
    return np.stack(probabilities), np.stack(embeddings)
