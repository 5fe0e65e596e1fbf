"""Every Triton config agrees with the registry: folder name, dims, labels, batching."""

import ast
import os
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build_engines.tensorrt import plan_filename
from client.constants import INPUT_NAME, MODEL_REPOSITORY, OUTPUT_NAME
from client.registry import list_models

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


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
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


def test_shared_python_model_holds_no_preprocessing():
    tree = ast.parse(SHARED_MODEL.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
    }
    assert imported == {"json", "pathlib", "numpy", "onnxruntime", "triton_python_backend_utils"}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for forbidden in ("mean", "std", "resize", "window", "normalize", "clip"):
        assert not any(forbidden in name.lower() for name in names), forbidden
