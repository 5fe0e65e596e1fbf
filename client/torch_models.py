"""The PyTorch companion path: torchvision architectures with our trained weights.

Used in-process by ``classify --local``, by Grad-CAM (TensorRT and ONNX have no
gradients) and by build_engines. torch is imported lazily by callers of this
module only, so the console runs without it.

    model = load_model(get_model("resnet18"))      # eval mode, float32, CPU
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file, save_file

from client.errors import MissingWeightsError
from client.preprocess import INPUT_SCALE, normalization_constants
from client.registry import ModelSpec

logger = logging.getLogger(__name__)

NUM_CLASSES = 2
#: The final linear head of each architecture: its input is the pooled embedding.
_HEAD_ATTRIBUTE = {"mobilenet_v2": "classifier", "resnet18": "fc"}


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """A freshly initialized torchvision ``spec.arch`` with a 2-class head."""
    return getattr(torchvision.models, spec.arch)(weights=None, num_classes=NUM_CLASSES)


class InputNormalization(torch.nn.Module):
    """:func:`client.preprocess.normalize` as the first layer of a network.

    Takes the uint8 (N, 3, S, S) model input (or a float tensor on the same
    0-255 scale) and returns the normalized float32 tensor the network was
    trained on, with the registry's mean and std from
    :func:`client.preprocess.normalization_constants`. The ONNX export puts it
    in front of the network (a Cast, a Div, a Sub and a Div in the graph), so
    Triton receives 150 KB of uint8 per slice and normalizes in the graph.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        mean, std = normalization_constants(spec)
        self.register_buffer("mean", torch.from_numpy(mean[None].copy()))
        self.register_buffer("std", torch.from_numpy(std[None].copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) to normalized float32 (N, 3, S, S)."""
        return (x.to(torch.float32) / INPUT_SCALE - self.mean) / self.std


class SliceNet(torch.nn.Module):
    """A slice classifier that also returns its pooled embedding.

    The embedding (what the final linear head reads) is the series model's
    input, so the one forward pass that scores a slice also describes it for
    the series context. The graph ends in a softmax: outputs are (N, 2)
    probabilities [normal, hemorrhage] and (N, D) embeddings.
    """

    def __init__(self, model: torch.nn.Module, arch: str) -> None:
        super().__init__()
        attribute = _HEAD_ATTRIBUTE[arch]
        self.head = getattr(model, attribute)
        setattr(model, attribute, torch.nn.Identity())
        self.body = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) normalized slices to probabilities and embeddings."""
        embedding = self.body(x)
        return torch.softmax(self.head(embedding), dim=1), embedding


class SeriesNet(torch.nn.Module):
    """The series model: refines each slice's logit with its neighbours and scores the series.

    Input (B, T, F) per-slice features from :func:`client.series.series_features`,
    the slice logit first. A bidirectional GRU or a dilated temporal convolution
    (``kind``) gives each slice its neighbours' context; the refined slice logit
    is the slice model's logit plus a learned correction, and the series logit is
    the highest refined slice logit, plus (``pooled``) a learned correction from
    the context pooled over the whole series. Both corrections start at zero, so
    an untrained series model is the slice model with a maximum over slices.
    """

    def __init__(
        self,
        n_features: int,
        kind: str = "gru",
        hidden: int = 32,
        dropout: float = 0.2,
        pooled: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("gru", "tcn"):
            raise ValueError(f"series model kind must be 'gru' or 'tcn', got {kind!r}")
        self.kind = kind
        self.project = torch.nn.Sequential(
            torch.nn.Dropout(dropout), torch.nn.Linear(n_features, hidden), torch.nn.GELU()
        )
        if kind == "gru":
            self.context = torch.nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        else:
            self.context = torch.nn.Sequential(
                torch.nn.Conv1d(hidden, 2 * hidden, 3, padding=1),
                torch.nn.GELU(),
                torch.nn.Conv1d(2 * hidden, 2 * hidden, 3, padding=2, dilation=2),
                torch.nn.GELU(),
            )
        self.slice_head = torch.nn.Linear(2 * hidden, 1)
        self.series_head = torch.nn.Linear(4 * hidden, 1) if pooled else None
        for head in (self.slice_head, self.series_head):
            if head is not None:
                torch.nn.init.zeros_(head.weight)
                torch.nn.init.zeros_(head.bias)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) features to refined slice logits (B, T) and series logits (B,).

        ``lengths`` (B,) marks zero-padded series in a training batch; serving
        sends one series at a time and leaves it out.
        """
        hidden = self.project(features)
        mask = None
        if lengths is not None:
            mask = torch.arange(features.shape[1])[None] < lengths[:, None]
            hidden = hidden * mask[..., None]
        if self.kind == "gru" and lengths is not None:
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                hidden, lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            context = torch.nn.utils.rnn.pad_packed_sequence(
                self.context(packed)[0], batch_first=True, total_length=features.shape[1]
            )[0]
        elif self.kind == "gru":
            context = self.context(hidden)[0]
        else:
            context = self.context(hidden.transpose(1, 2)).transpose(1, 2)
        slice_logits = features[..., 0] + self.slice_head(context).squeeze(-1)
        if mask is None:
            pooled = torch.cat([context.amax(1), context.mean(1)], dim=-1)
            top = slice_logits.amax(1)
        else:
            outside = ~mask[..., None]
            pooled = torch.cat(
                [
                    context.masked_fill(outside, -1e4).amax(1),
                    (context * mask[..., None]).sum(1) / lengths[:, None],
                ],
                dim=-1,
            )
            top = slice_logits.masked_fill(~mask, -1e4).amax(1)
        if self.series_head is None:
            return slice_logits, top
        return slice_logits, top + self.series_head(pooled).squeeze(-1)


class SeriesEnsemble(torch.nn.Module):
    """Series models trained with different seeds, their probabilities averaged: what is served.

    Input (1, T, F) features of one series (:func:`client.series.series_features`);
    outputs (1, T) refined slice probabilities and (1,) the series probability,
    so the ONNX graph Triton serves ends in probabilities like the slice models'.
    """

    def __init__(self, members: list[SeriesNet]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, T, F) features to (1, T) slice and (1,) series probabilities."""
        outputs = [member(features) for member in self.members]
        slices = torch.stack([torch.sigmoid(s) for s, _ in outputs]).mean(0)
        series = torch.stack([torch.sigmoid(r) for _, r in outputs]).mean(0)
        return slices, series


def build_series_ensemble(facts: dict) -> SeriesEnsemble:
    """An untrained ensemble shaped as the sidecar's ``series_model`` facts describe."""
    return SeriesEnsemble(
        [
            SeriesNet(
                facts["features"], facts["kind"], facts["hidden"], pooled=facts.get("pooled", True)
            )
            for _ in range(facts["members"])
        ]
    ).eval()


def load_series_model(spec: ModelSpec) -> SeriesEnsemble:
    """``spec``'s committed series model, checked against the hash in its sidecar.

    Raises:
        MissingWeightsError: the sidecar names no series model, or its file is
            absent or fails its checksum.
    """
    facts = spec.series_model_facts
    path = spec.series_weights_path
    if facts is None:
        raise MissingWeightsError(
            f"{spec.facts_path.name} names no series model; run 'python -m build_engines series'"
        )
    if not path.exists():
        raise MissingWeightsError(f"{path} is missing; run 'python -m build_engines series'")
    actual = file_sha256(path)
    if actual != facts["weights_sha256"]:
        raise MissingWeightsError(
            f"{path.name} checksum {actual[:12]} does not match {facts['weights_sha256'][:12]}"
            f" recorded in {spec.facts_path.name}"
        )
    model = build_series_ensemble(facts)
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, to pin weights to the facts recorded with them."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_model(spec: ModelSpec, device: str = "cpu") -> torch.nn.Module:
    """Build ``spec.arch`` and load its committed fp16 weights as float32.

    Raises:
        MissingWeightsError: the weight file is absent, fails its checksum, or was
            trained on a slice with its neighbours (``context`` 2.5d in the sidecar),
            which the one-slice input of every serving path cannot give it, or on
            views with the scalp stripped (``scalp`` strip), which serving does not make.
    """
    path = spec.weights_path
    context = spec.trained.extra.get("context", "2d")
    if context != "2d":
        raise MissingWeightsError(
            f"{path.name} was trained on {context} input (a slice with its neighbours); "
            "serving sends one slice at a time, so these weights cannot be served"
        )
    if spec.trained.extra.get("scalp", "keep") != "keep":
        raise MissingWeightsError(
            f"{path.name} was trained on views with the scalp stripped; "
            "serving keeps the whole head, so these weights cannot be served"
        )
    if not path.exists():
        raise MissingWeightsError(f"{path} is missing; run 'make train'")
    expected = spec.trained.weights_sha256
    actual = file_sha256(path)
    if actual != expected:
        raise MissingWeightsError(
            f"{path.name} checksum {actual[:12]} does not match {expected[:12]}"
            f" recorded in {spec.facts_path.name}"
        )
    model = load_weights_file(spec, path)
    logger.info("loaded %s (%s)", spec.name, actual[:12])
    return model.to(device).eval()


def load_weights_file(spec: ModelSpec, path: Path) -> torch.nn.Module:
    """``spec.arch`` with the fp16 safetensors at ``path`` as float32, in eval mode, unchecked.

    For weights a training run wrote itself (fold models); served weights go
    through :func:`load_model`, which checks them against their recorded hash.
    """
    model = build_model(spec)
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


def save_weights(model: torch.nn.Module, path: Path) -> str:
    """Save float tensors as fp16 safetensors (integer buffers kept); return the SHA-256."""
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return file_sha256(path)
