"""Every Triton config agrees with the registry: folder name, dims, labels, batching."""

import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build_engines.tensorrt import plan_filename
from client.constants import (
    INPUT_NAME,
    MODEL_REPOSITORY,
    OUTPUT_NAME,
    SERIES_INPUT_NAME,
    SERIES_OUTPUT_NAME,
    SERIES_SLICE_OUTPUT_NAME,
)
from client.registry import get_model, list_models, series_model_names
from client.series import series_features

SPECS = list_models()
SHARED_MODEL = MODEL_REPOSITORY / "onnx_runtime_model.py"


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("config_name", ["config.pbtxt", "configs/cpu.pbtxt"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_config_matches_registry(spec, config_name):
    config = _parse(spec.repository_dir / config_name)
    assert config.name == spec.name == spec.repository_dir.name
    assert config.max_batch_size == spec.max_batch_size
    [tensor_in] = config.input
    assert (tensor_in.name, list(tensor_in.dims)) == (
        INPUT_NAME,
        [3, spec.input_size, spec.input_size],
    )
    assert tensor_in.data_type == model_config_pb2.TYPE_UINT8  # normalized in the graph
    [warmup] = config.model_warmup
    assert warmup.inputs[INPUT_NAME].data_type == model_config_pb2.TYPE_UINT8
    [tensor_out] = config.output
    assert (tensor_out.name, list(tensor_out.dims)) == (OUTPUT_NAME, [len(spec.labels)])
    assert spec.labels == ["normal", "hemorrhage"]
    assert tensor_out.label_filename == spec.labels_file
    batching = config.dynamic_batching
    assert batching.priority_levels == 2
    assert batching.default_priority_level == 2
    assert 0 < batching.max_queue_delay_microseconds <= 10_000
    assert config.instance_group
    assert config.model_warmup


@pytest.mark.parametrize("config_name", ["config.pbtxt", "configs/cpu.pbtxt"])
@pytest.mark.parametrize("name", series_model_names())
def test_series_model_configs_take_one_series_of_any_length(name, config_name):
    folder = MODEL_REPOSITORY / name
    config = _parse(folder / config_name)
    assert config.name == name
    assert config.max_batch_size == 0  # series differ in length: one series per request
    [tensor_in] = config.input
    features = series_features([0.5, 0.5], [0.3, 0.3]).shape[1]
    assert (tensor_in.name, list(tensor_in.dims)) == (SERIES_INPUT_NAME, [1, -1, features])
    assert {(t.name, tuple(t.dims)) for t in config.output} == {
        (SERIES_SLICE_OUTPUT_NAME, (1, -1)),
        (SERIES_OUTPUT_NAME, (1,)),
    }
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    link = folder / "1" / "model.py"
    assert link.is_symlink() and link.resolve() == SHARED_MODEL.resolve()
    backend = "python" if config_name.startswith("configs/") else "onnxruntime"
    assert config.backend == backend


@pytest.mark.parametrize("spec", list_models(runtime="onnxruntime"), ids=lambda s: s.name)
def test_gpu_config_names_a_plan_per_compute_capability(spec):
    config = _parse(spec.repository_dir / "config.pbtxt")
    assert config.platform == "tensorrt_plan"
    assert config.cc_model_filenames["9.0"] == plan_filename((9, 0)) == "model_sm90.plan"
    for capability, filename in config.cc_model_filenames.items():
        major, minor = map(int, capability.split("."))
        assert filename == plan_filename((major, minor))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_cpu_config_runs_the_one_shared_python_model(spec):
    config = _parse(spec.repository_dir / "configs" / "cpu.pbtxt")
    assert config.backend == "python"
    link = spec.repository_dir / "1" / "model.py"
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link))
    assert link.resolve() == SHARED_MODEL.resolve()
    assert (spec.repository_dir / "1" / ".gitkeep").exists()


@pytest.mark.parametrize("spec", list_models(runtime="openvino"), ids=lambda s: s.name)
def test_openvino_entries_serve_their_twin_graph_in_both_servers(spec):
    gpu = _parse(spec.repository_dir / "config.pbtxt")
    assert (gpu.backend, gpu.default_model_filename) == ("openvino", "model.onnx")
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert ("HINT_BF16" in gpu.parameters) is (spec.precision == "bf16")
    cpu = _parse(spec.repository_dir / "configs" / "cpu.pbtxt")
    parameters = {k: v.string_value for k, v in cpu.parameters.items()}
    hint = "bf16" if spec.precision == "bf16" else "f32"
    assert parameters == {
        "runtime": "openvino",
        "intra_op_thread_count": "2",
        "inference_precision_hint": hint,
    }
    graph = spec.repository_dir / "1" / "model.onnx"
    assert graph.is_symlink()
    assert os.readlink(graph) == f"../../{spec.graph_name}/1/model.onnx"
    assert get_model(spec.graph_name).runtime == "onnxruntime"


def test_onnx_runtime_entries_run_onnx_runtime():
    for spec in list_models(runtime="onnxruntime"):
        cpu = _parse(spec.repository_dir / "configs" / "cpu.pbtxt")
        assert cpu.parameters.get("runtime") is None  # the shared model's default
        assert not (spec.repository_dir / "1" / "model.onnx").is_symlink()


@pytest.fixture(scope="module")
def shared_model():
    """The shared python model, imported with the real triton_python_backend_utils."""
    pytriton = pytest.importorskip("pytriton")
    backend = Path(pytriton.__file__).parent / "tritonserver" / "backends" / "python"
    sys.path.insert(0, str(backend))
    try:
        loaded = importlib.util.spec_from_file_location("shared_model", SHARED_MODEL)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    finally:
        sys.path.remove(str(backend))
    return module


def test_bf16_is_asked_for_only_where_the_cpu_lists_it(shared_model):
    choose = shared_model._inference_precision
    assert choose("bf16", ["BF16", "FP32", "INT8"]) == "bf16"
    assert choose("bf16", ["FP32", "INT8", "BIN"]) == "f32"  # AVX2 or AVX-512 without BF16
    assert choose("f32", ["BF16", "FP32"]) == "f32"
    with pytest.raises(ValueError, match="f32 or bf16"):
        choose("fp16", ["FP16"])


def test_shared_python_model_holds_no_preprocessing():
    tree = ast.parse(SHARED_MODEL.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
    }
    assert imported == {
        "json",
        "pathlib",
        "numpy",
        "onnxruntime",
        "openvino",
        "triton_python_backend_utils",
    }
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for forbidden in ("mean", "std", "resize", "window", "normalize", "clip"):
        assert not any(forbidden in name.lower() for name in names), forbidden
