"""TensorRT plans: per-capability names; a clear error where TensorRT or CUDA is absent."""

import importlib.util

import pytest

from build_engines.tensorrt import TensorRTUnavailableError, build, build_plan, plan_filename
from client.registry import get_model

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_plan_names_follow_compute_capability():
    assert plan_filename((9, 0)) == "model_sm90.plan"
    assert plan_filename((8, 6)) == "model_sm86.plan"


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_typed_error_with_advice():
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed"):
        build_plan(get_model("resnet18"))


def test_torch2trt_refuses_int8_models():
    with pytest.raises(ValueError, match="fp32 models only"):
        build("resnet18_int8", builder="torch2trt")


def test_unknown_builder_is_refused():
    with pytest.raises(ValueError, match="builder must be one of"):
        build("resnet18", builder="onnx-tensorrt")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18_int8"])
def test_plan_has_a_batch_profile_from_1_to_max(name, tmp_path, data_dir):
    if not (HAS_TENSORRT and _has_cuda()):
        pytest.skip("needs TensorRT and a CUDA GPU")
    import tensorrt as trt
    import torch

    from build_engines.quantize import quantize_model

    spec = get_model(name)
    base = get_model(spec.weights_name or spec.name)
    if not base.onnx_path.exists():
        pytest.skip("ONNX not built; run 'python -m build_engines export'")
    onnx_path = base.onnx_path
    if spec.precision == "int8":
        onnx_path = quantize_model(spec, 16, out_path=tmp_path / "trt.onnx", target="tensorrt")
    path = build_plan(spec, onnx_path=onnx_path, out_dir=tmp_path)
    assert path.name == plan_filename(torch.cuda.get_device_capability(0))
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    assert engine is not None
    profile_min, _, profile_max = engine.get_tensor_profile_shape("input", 0)
    assert (profile_min[0], profile_max[0]) == (1, spec.max_batch_size)
