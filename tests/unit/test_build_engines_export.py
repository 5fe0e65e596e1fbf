"""ONNX export: checker-clean, dynamic batch, softmax inside, same answers as PyTorch."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from build_engines.export_onnx import (
    OPSET,
    PARITY_TOLERANCE,
    ParityError,
    check_onnx,
    check_parity,
    export_onnx,
)
from client.classify import LocalClassifier
from client.constants import INPUT_NAME, OUTPUT_NAME
from client.errors import MissingWeightsError
from client.registry import get_model


@pytest.fixture(scope="module", params=["mobilenet_v2", "resnet18"])
def exported(request, tmp_path_factory):
    spec = get_model(request.param)
    return spec, export_onnx(spec, tmp_path_factory.mktemp(spec.name) / "model.onnx")


def test_export_is_checker_clean_with_dynamic_batch_and_named_tensors(exported):
    _, path = exported
    model = check_onnx(path)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
    [tensor_in] = model.graph.input
    [tensor_out] = model.graph.output
    assert tensor_in.name == INPUT_NAME and tensor_out.name == OUTPUT_NAME
    assert tensor_in.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert tensor_in.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    # The normalization is in the graph: the input is read by a Cast to float.
    assert [n.op_type for n in model.graph.node if INPUT_NAME in n.input] == ["Cast"]
    assert model.graph.node[-1].op_type == "Softmax"


def test_onnx_matches_pytorch_on_real_slices(exported, real_batch):
    # ONNX Runtime on the uint8 input against the network on normalize() of it.
    spec, path = exported
    assert real_batch.dtype == np.uint8
    assert check_parity(spec, path, real_batch) <= PARITY_TOLERANCE


def test_graph_normalization_is_the_registry_one(exported):
    spec, _ = exported
    import torch

    from client.preprocess import normalize
    from client.torch_models import InputNormalization

    batch = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    with torch.inference_mode():
        in_graph = InputNormalization(spec)(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(in_graph, normalize(batch, spec), atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_any_batch_size_gives_probabilities(exported, real_batch, batch_size):
    _, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run([OUTPUT_NAME], {INPUT_NAME: real_batch[:batch_size]})[0]
    assert out.shape == (batch_size, 2)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_parity_failure_is_a_typed_error(exported, real_batch, tmp_path):
    spec, path = exported
    model = onnx.load(str(path))
    other = "resnet18" if spec.name == "mobilenet_v2" else "mobilenet_v2"
    wrong = export_onnx(get_model(other), tmp_path / "other.onnx")
    with pytest.raises(ParityError, match="max"):
        check_parity(spec, wrong, real_batch, tolerance=0.0)
    assert model.graph.input[0].name == INPUT_NAME


def test_int8_entries_are_not_exported_directly():
    with pytest.raises(ValueError, match="export its fp32 base"):
        export_onnx(get_model("resnet18_int8"))


@pytest.mark.parametrize(
    ("trained_on", "message"),
    [({"context": "2.5d"}, r"2\.5d input"), ({"scalp": "strip"}, "scalp stripped")],
)
def test_weights_trained_on_other_input_than_serving_makes_are_never_served(
    monkeypatch, tmp_path, trained_on, message
):
    """The sidecar stops a 2.5D or scalp-stripped model before Triton, Grad-CAM or --local."""
    facts = json.loads(get_model("mobilenet_v2").facts_path.read_text())
    (tmp_path / "mobilenet_v2.json").write_text(json.dumps(facts | trained_on))
    monkeypatch.setattr("client.registry.WEIGHTS_DIR", tmp_path)
    with pytest.raises(MissingWeightsError, match=message):
        export_onnx(get_model("mobilenet_v2"), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
    with pytest.raises(MissingWeightsError, match=message):
        LocalClassifier(get_model("mobilenet_v2"))
