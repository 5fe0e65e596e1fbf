"""TensorRT engines (plans) for the GPU Triton, one per compute capability.

A plan only runs on the GPU architecture it was built on, so each one is named
for its compute capability (``model_sm90.plan`` on an H100) and the model's
``config.pbtxt`` maps capabilities to files with ``cc_model_filenames``. fp32
models become FP16 engines built from their ``model.onnx``; ``*_int8`` models
become INT8 engines built from their QDQ ``model.onnx`` (explicit
quantization: the scales come from ONNX Runtime's calibration, TensorRT needs
no calibrator). The input is the client's uint8 (N, 3, S, S) model input and
the graph's first nodes normalize it, as in ONNX Runtime (the ONNX parser maps
the uint8 input and its Cast; TensorRT 8.6+ accepts uint8 network inputs).
Every engine has one optimization profile on the batch axis:
min 1, opt 8, max ``spec.max_batch_size`` (Triton's ``max_batch_size``).

    python -m build_engines build-trt --model resnet18          # TensorRT API
    python -m build_engines build-trt --model resnet18 --builder torch2trt

Where TensorRT or a CUDA GPU is missing, :class:`TensorRTUnavailableError` says so.
See https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html
"""

from __future__ import annotations

import logging
from pathlib import Path

from client.constants import INPUT_NAME, OUTPUT_NAME
from client.errors import HemoTriageError, ModelNotReadyError
from client.registry import ModelSpec, get_model

logger = logging.getLogger(__name__)

#: Batch size TensorRT tunes kernels for (the dynamic batcher's usual batch).
OPT_BATCH_SIZE = 8
#: Builder scratch memory.
WORKSPACE_GIB = 2
BUILDERS = ("tensorrt", "torch2trt")


class TensorRTUnavailableError(HemoTriageError):
    """TensorRT (or torch2trt), CUDA or a GPU is missing on this machine."""


def compute_capability() -> tuple[int, int]:
    """(major, minor) of CUDA device 0.

    Raises:
        TensorRTUnavailableError: no CUDA device is visible.
    """
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(
            "no CUDA GPU visible: TensorRT engines must be built on the GPU that will run them"
        )
    return torch.cuda.get_device_capability(0)


def plan_filename(capability: tuple[int, int]) -> str:
    """``model_sm<major><minor>.plan``, the name config.pbtxt's cc_model_filenames uses."""
    major, minor = capability
    return f"model_sm{major}{minor}.plan"


def plan_path(spec: ModelSpec, capability: tuple[int, int]) -> Path:
    """Where the plan for ``spec`` on ``capability`` goes in the model repository."""
    return spec.repository_dir / "1" / plan_filename(capability)


def build_plan(
    spec: ModelSpec,
    max_batch_size: int | None = None,
    opt_batch_size: int = OPT_BATCH_SIZE,
    workspace_gib: float = WORKSPACE_GIB,
    onnx_path: Path | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Build ``spec``'s engine with the TensorRT Python API (FP16, or INT8 for int8 models).

    Args:
        spec: Any registry model; its ``model.onnx`` must exist.
        max_batch_size: Profile maximum; ``spec.max_batch_size`` by default. Triton
            refuses an engine whose maximum is below the config's ``max_batch_size``.
        opt_batch_size: Profile optimum.
        workspace_gib: Builder workspace limit.
        onnx_path: ONNX to build from; ``spec.onnx_path`` by default.
        out_dir: Folder of the plan; the model's version folder by default.

    Returns:
        The written plan path.

    Raises:
        TensorRTUnavailableError: TensorRT or a CUDA GPU is missing.
        ModelNotReadyError: the ONNX file is missing or TensorRT cannot parse or build it.
    """
    trt = _import_tensorrt()
    capability = compute_capability()
    max_batch_size = max_batch_size or spec.max_batch_size
    _check_profile(spec, opt_batch_size, max_batch_size)
    onnx_path = Path(onnx_path or spec.onnx_path)
    if not onnx_path.exists():
        raise ModelNotReadyError(f"{onnx_path} missing; run 'python -m build_engines export'")
    if spec.precision == "int8":
        _check_symmetric_int8(onnx_path)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # TensorRT 10 is always explicit-batch
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelNotReadyError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    config.set_flag(trt.BuilderFlag.FP16)
    if spec.precision == "int8":
        # The QDQ nodes carry the scales; the flag lets TensorRT pick INT8 kernels.
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    shape = (3, spec.input_size, spec.input_size)
    profile.set_shape(INPUT_NAME, (1, *shape), (opt_batch_size, *shape), (max_batch_size, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelNotReadyError(f"TensorRT failed to build {spec.name}; see its log above")
    path = Path(out_dir) / plan_filename(capability) if out_dir else plan_path(spec, capability)
    path.write_bytes(bytes(serialized))
    logger.info("built %s (%s, sm%d%d) -> %s", spec.name, spec.precision, *capability, path)
    return path


def build_plan_torch2trt(
    spec: ModelSpec, max_batch_size: int | None = None, opt_batch_size: int = OPT_BATCH_SIZE
) -> Path:
    """Build an FP16 engine straight from the torch weights with torch2trt.

    Args:
        spec: An fp32 registry model (torch2trt's INT8 path needs its own
            calibrator; use :func:`build_plan` on the QDQ ONNX for INT8).
        max_batch_size: Profile maximum; ``spec.max_batch_size`` by default.
        opt_batch_size: Profile optimum.

    Returns:
        The written plan path.

    Raises:
        TensorRTUnavailableError: torch2trt, TensorRT or a CUDA GPU is missing.
        ValueError: ``spec`` is an int8 model.
    """
    if spec.precision != "fp32":
        raise ValueError(
            f"torch2trt builds fp32 models only; build {spec.name} with --builder tensorrt"
        )
    try:
        from torch2trt import torch2trt
    except ImportError as e:
        raise TensorRTUnavailableError("torch2trt is not installed; use --builder tensorrt") from e
    import torch

    from build_engines.export_onnx import ServedModel
    from client.torch_models import load_model

    capability = compute_capability()
    max_batch_size = max_batch_size or spec.max_batch_size
    _check_profile(spec, opt_batch_size, max_batch_size)
    # The same contract as the ONNX graph: uint8 model input, normalization inside.
    model = ServedModel(spec, load_model(spec, device="cuda")).to("cuda").eval()
    shape = (3, spec.input_size, spec.input_size)
    example = torch.zeros((opt_batch_size, *shape), dtype=torch.uint8, device="cuda")
    trt_module = torch2trt(
        model,
        [example],
        fp16_mode=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        min_shapes=[(1, *shape)],
        opt_shapes=[(opt_batch_size, *shape)],
        max_shapes=[(max_batch_size, *shape)],
    )
    path = plan_path(spec, capability)
    path.write_bytes(bytes(trt_module.engine.serialize()))
    logger.info("built %s with torch2trt (sm%d%d) -> %s", spec.name, *capability, path)
    return path


def build(spec_name: str, builder: str = "tensorrt", max_batch_size: int | None = None) -> Path:
    """Build one model's engine with the chosen builder; see :func:`build_plan`.

    Raises:
        ValueError: unknown builder.
    """
    spec = get_model(spec_name)
    if builder == "tensorrt":
        return build_plan(spec, max_batch_size)
    if builder == "torch2trt":
        return build_plan_torch2trt(spec, max_batch_size)
    raise ValueError(f"builder must be one of {BUILDERS}, got {builder!r}")


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailableError(
            "TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU, "
            "or run inside the Triton container); the CPU server needs no engines"
        ) from e
    return tensorrt


def _check_symmetric_int8(path: Path) -> None:
    """TensorRT takes only int8 Q/DQ with zero point 0; the CPU variant uses uint8."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    zero_points = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            zero_point = zero_points.get(node.input[2])
            if zero_point is not None and zero_point.data_type != onnx.TensorProto.INT8:
                raise ModelNotReadyError(
                    f"{path} has uint8 activations (the CPU variant); run "
                    "'python -m build_engines quantize --target tensorrt' first"
                )


def _check_profile(spec: ModelSpec, opt_batch_size: int, max_batch_size: int) -> None:
    if not 1 <= opt_batch_size <= max_batch_size:
        raise ValueError(f"need 1 <= opt ({opt_batch_size}) <= max ({max_batch_size})")
    if max_batch_size < spec.max_batch_size:
        logger.warning(
            "%s: engine max batch %d < config max_batch_size %d; Triton will refuse it "
            "unless config.pbtxt is lowered to match",
            spec.name,
            max_batch_size,
            spec.max_batch_size,
        )
