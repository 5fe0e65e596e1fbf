"""ImageNet MobileNetV2 weights for torchvision, read from the quantized TFLite file.

Why: a few hundred labelled head CT slices are not enough to train MobileNetV2
from random weights; ImageNet features give fine-tuning a better start. The only
ImageNet MobileNetV2 on hand is TensorFlow's 8-bit
``mobilenet_v2_1.0_224_quant.tflite`` (Apache-2.0, 1001 classes, batch norm
folded into the convolutions). It lives beside the checkout, read in place and
never copied into the repository.

How: the file's CONV_2D and DEPTHWISE_CONV_2D ops, in graph order, line up one to
one with the convolutions of ``torchvision.models.mobilenet_v2`` in module order.
Each weight tensor is dequantized, ``(q - zero_point) * scale``, and turned from
TFLite's OHWI (depthwise: 1HWC) layout into torch's OIHW (depthwise: C1HW). As
batch norm is already folded in, every torch BatchNorm2d becomes a pass-through
that adds the folded bias (weight 1, running mean 0, running variance
``1 - eps``, so ``(x - 0) / sqrt(var + eps) == x``); fine-tuning then trains it
as usual. The 1001-class classifier is skipped: the torch head stays freshly
initialized for our classes.

The network expects inputs in ``[-1, 1]`` (the TFLite input is
``(pixel - 128) / 128``), which is what preprocessing with mean 0.5 and std 0.5
gives. TFLite pads stride-2 convolutions "SAME" (nothing before, one pixel
after) where torchvision pads one pixel on both sides, so activations are
shifted by a pixel after each stride-2 layer. Checked against the TFLite
interpreter on three photos, a head CT slice and a synthetic pattern (classifier loaded
too, for the check only): with TF padding patched in, the 1001-class logits
correlate at 0.986-0.999 with the same top-1 on all five; with torchvision's
padding, as here, at 0.60-0.93 (top-1 same on three of five). Close to, not
exactly, the TFLite network: a starting point, which fine-tuning adapts.

    model = torchvision.models.mobilenet_v2(weights=None, num_classes=2)
    n = load_imagenet_mobilenet_v2(model)  # 260 tensors, all but classifier.*
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tflite
import torch
from torch import nn

from client.constants import REPO_ROOT
from client.errors import MissingWeightsError

logger = logging.getLogger(__name__)

#: The quantized ImageNet MobileNetV2, beside the checkout (read-only).
DEFAULT_PATH = REPO_ROOT.parent / "shared" / "pretrained" / "mobilenet_v2_1.0_224_quant.tflite"

_NUMPY_TYPES = {
    tflite.TensorType.UINT8: np.uint8,
    tflite.TensorType.INT8: np.int8,
    tflite.TensorType.INT32: np.int32,
    tflite.TensorType.FLOAT32: np.float32,
}
_ACTIVATIONS = {
    tflite.ActivationFunctionType.NONE: None,
    tflite.ActivationFunctionType.RELU6: "relu6",
}


@dataclass(frozen=True)
class FoldedConv:
    """One convolution of the TFLite graph, dequantized, in torch layout.

    Attributes:
        name: Name of the TFLite weight tensor (for error messages).
        depthwise: True for a DEPTHWISE_CONV_2D op.
        stride: Stride (height, width).
        activation: Fused activation: ``"relu6"`` or None.
        weight: Float32 weights, OIHW (depthwise: ``(C, 1, H, W)``).
        bias: Float32 folded batch-norm bias, shape ``(O,)``.
    """

    name: str
    depthwise: bool
    stride: tuple[int, int]
    activation: str | None
    weight: np.ndarray
    bias: np.ndarray


def _dequantize(model: tflite.Model, tensor: tflite.Tensor) -> np.ndarray:
    """Float32 values of a constant tensor, per-tensor or per-channel dequantized.

    Args:
        model: The flatbuffer model holding the tensor's buffer.
        tensor: A constant (weight or bias) tensor.

    Returns:
        The dequantized values, in the tensor's own (TFLite) shape.

    Raises:
        ValueError: The tensor has no data or an unsupported type.
    """
    name = tensor.Name().decode()
    dtype = _NUMPY_TYPES.get(tensor.Type())
    if dtype is None:
        raise ValueError(f"tensor {name!r}: unsupported TFLite type {tensor.Type()}")
    raw = model.Buffers(tensor.Buffer()).DataAsNumpy()
    if isinstance(raw, int) or raw.size == 0:
        raise ValueError(f"tensor {name!r} holds no constant data")
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
    values = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape).astype(np.float64)
    quant = tensor.Quantization()
    if dtype is np.float32 or quant is None or quant.ScaleLength() == 0:
        return values.astype(np.float32)
    scale = quant.ScaleAsNumpy().astype(np.float64)
    zero_point = (
        quant.ZeroPointAsNumpy().astype(np.float64)
        if quant.ZeroPointLength()
        else np.zeros_like(scale)
    )
    if scale.size > 1:  # per-channel: broadcast along the quantized dimension
        axis_shape = [1] * len(shape)
        axis_shape[quant.QuantizedDimension()] = scale.size
        scale = scale.reshape(axis_shape)
        zero_point = zero_point.reshape(axis_shape)
    return ((values - zero_point) * scale).astype(np.float32)


def read_folded_convs(tflite_path: Path = DEFAULT_PATH) -> list[FoldedConv]:
    """Every CONV_2D / DEPTHWISE_CONV_2D op of a TFLite file, in graph order.

    The last one of the ImageNet MobileNetV2 is the 1001-class classifier (a 1x1
    convolution over the pooled features).

    Args:
        tflite_path: The ``.tflite`` file.

    Returns:
        The dequantized convolutions, weights already in torch layout.

    Raises:
        MissingWeightsError: The file does not exist.
        ValueError: An op has an activation or tensor this loader cannot map.
    """
    if not tflite_path.is_file():
        raise MissingWeightsError(f"pretrained TFLite weights not found: {tflite_path}")
    buf = tflite_path.read_bytes()
    model = tflite.Model.GetRootAsModel(buf, 0)
    graph = model.Subgraphs(0)
    convs: list[FoldedConv] = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == tflite.BuiltinOperator.CONV_2D:
            options = tflite.Conv2DOptions()
            depthwise = False
        elif builtin == tflite.BuiltinOperator.DEPTHWISE_CONV_2D:
            options = tflite.DepthwiseConv2DOptions()
            depthwise = True
        else:
            continue
        table = op.BuiltinOptions()
        options.Init(table.Bytes, table.Pos)
        weight_tensor = graph.Tensors(op.Inputs(1))
        name = weight_tensor.Name().decode()
        if options.FusedActivationFunction() not in _ACTIVATIONS:
            raise ValueError(
                f"op {i} ({name}): fused activation {options.FusedActivationFunction()} "
                "has no torchvision MobileNetV2 counterpart"
            )
        weight = _dequantize(model, weight_tensor)
        # OHWI -> OIHW; depthwise 1HWC -> C1HW.
        weight = weight.transpose(3, 0, 1, 2) if depthwise else weight.transpose(0, 3, 1, 2)
        if op.InputsLength() > 2 and op.Inputs(2) >= 0:
            bias = _dequantize(model, graph.Tensors(op.Inputs(2)))
        else:
            bias = np.zeros(weight.shape[0], dtype=np.float32)
        convs.append(
            FoldedConv(
                name=name,
                depthwise=depthwise,
                stride=(options.StrideH(), options.StrideW()),
                activation=_ACTIVATIONS[options.FusedActivationFunction()],
                weight=np.ascontiguousarray(weight),
                bias=bias,
            )
        )
    return convs


def _conv_bn_pairs(features: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d, bool]]:
    """Each Conv2d of ``features`` with the BatchNorm2d after it, in module order.

    Args:
        features: ``model.features`` of a torchvision MobileNetV2.

    Returns:
        ``(name, conv, bn, relu6)``; ``relu6`` tells whether a ReLU6 follows the BN.

    Raises:
        ValueError: A convolution is not directly followed by a batch norm.
    """
    pairs = []
    for name, conv in features.named_modules(prefix="features"):
        if not isinstance(conv, nn.Conv2d):
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = features.get_submodule(parent_name.removeprefix("features").lstrip("."))
        children = list(parent.named_children())
        k = [n for n, _ in children].index(child_name)
        bn = children[k + 1][1] if k + 1 < len(children) else None
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"{name}: Conv2d not followed by BatchNorm2d")
        relu6 = k + 2 < len(children) and isinstance(children[k + 2][1], nn.ReLU6)
        pairs.append((name, conv, bn, relu6))
    return pairs


def load_imagenet_mobilenet_v2(model: nn.Module, tflite_path: Path = DEFAULT_PATH) -> int:
    """Load the ImageNet MobileNetV2 into a torchvision MobileNetV2, in place.

    Every ``features.*`` convolution gets the dequantized TFLite weights and its
    batch norm becomes a pass-through adding the folded bias. ``classifier.*``
    is left as it is.

    Args:
        model: ``torchvision.models.mobilenet_v2(weights=None, num_classes=...)``
            (width multiplier 1.0).
        tflite_path: The quantized ImageNet MobileNetV2 ``.tflite`` file.

    Returns:
        The number of tensors written: per convolution its weight and the BN's
        weight, bias, running mean and running variance (260 in all).

    Raises:
        MissingWeightsError: The TFLite file does not exist.
        ValueError: The model and the file do not line up (count, shape, type,
            stride or activation of a convolution).
    """
    convs = read_folded_convs(tflite_path)[:-1]  # the last op is the 1001-class classifier
    features = getattr(model, "features", None)
    if features is None:
        raise ValueError("model has no .features: expected torchvision's mobilenet_v2")
    pairs = _conv_bn_pairs(features)
    if len(pairs) != len(convs):
        raise ValueError(
            f"{tflite_path.name} has {len(convs)} feature convolutions, "
            f"the model has {len(pairs)}: not a MobileNetV2 1.0 pair"
        )
    loaded = 0
    with torch.no_grad():
        for (name, conv, bn, relu6), src in zip(pairs, convs, strict=True):
            where = f"{name} <- {src.name}"
            depthwise = conv.groups > 1 and conv.groups == conv.in_channels
            if tuple(conv.weight.shape) != src.weight.shape:
                raise ValueError(f"{where}: shape {tuple(conv.weight.shape)} != {src.weight.shape}")
            if depthwise != src.depthwise:
                raise ValueError(f"{where}: depthwise {depthwise} != {src.depthwise}")
            if tuple(conv.stride) != src.stride:
                raise ValueError(f"{where}: stride {tuple(conv.stride)} != {src.stride}")
            if relu6 != (src.activation == "relu6"):
                raise ValueError(f"{where}: ReLU6 {relu6} != fused {src.activation}")
            if conv.bias is not None:
                raise ValueError(f"{where}: expected a bias-free Conv2d before BatchNorm2d")
            conv.weight.copy_(torch.from_numpy(src.weight))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(src.bias))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            loaded += 5
    logger.info("loaded %d tensors (%d convolutions) from %s", loaded, len(pairs), tflite_path.name)
    return loaded


def calibrate_batch_norm(model: nn.Module, batch: torch.Tensor) -> None:
    """Give each pass-through batch norm the statistics of ``batch``, keeping the function.

    Why: in training mode a batch norm divides by the batch's own spread and
    adds its bias. A pass-through norm (weight 1, folded bias) then no longer
    computes what the folded TFLite network computed; the folded biases, sized
    for un-normalized activations, push whole layers below zero and their
    ReLU6 units die (the last 1280-channel layer went silent on most CT
    slices). Setting ``running_mean/var`` to the statistics of real slices and
    ``weight = sqrt(var + eps)``, ``bias = mean + folded_bias`` leaves the
    evaluation-mode function exactly as loaded and makes training-mode batches
    start from it too.

    Args:
        model: A MobileNetV2 loaded by :func:`load_imagenet_mobilenet_v2`.
        batch: Normalized training slices, ``(N, 3, H, W)``; a few dozen suffice.
    """
    stats: dict[nn.BatchNorm2d, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        stats[module] = (x.mean((0, 2, 3)), x.var((0, 2, 3)))

    norms = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(record) for m in norms]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    with torch.no_grad():
        for bn in norms:
            mean, var = stats[bn]
            folded_bias = bn.bias.clone()
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mean + folded_bias)
