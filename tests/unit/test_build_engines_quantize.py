"""INT8 static quantization: QDQ per-channel graph, calibrated on real slices, close to fp32."""

import numpy as np
import onnx
import pytest

from build_engines.export_onnx import onnx_probabilities
from build_engines.quantize import (
    Int8Comparison,
    SliceCalibrationReader,
    compare_int8,
    format_comparisons,
    quantize_model,
)
from build_engines.tensorrt import _check_symmetric_int8
from client.constants import INPUT_NAME
from client.errors import ModelNotReadyError
from client.registry import get_model


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, data_dir):
    spec = get_model("resnet18_int8")
    if not get_model(spec.weights_name).onnx_path.exists():
        pytest.skip("fp32 ONNX not built; run 'python -m build_engines export'")
    out_path = tmp_path_factory.mktemp("quantized") / "model.onnx"
    return spec, quantize_model(spec, calibration_size=8, out_path=out_path)


def test_calibration_reader_feeds_preprocessed_batches_and_rewinds(data_dir):
    reader = SliceCalibrationReader(get_model("mobilenet_v2"), size=6, batch_size=4)
    first = [reader.get_next() for _ in range(3)]
    assert [b[INPUT_NAME].shape[0] for b in first[:2]] == [4, 2]
    assert first[2] is None
    assert first[0][INPUT_NAME].dtype == np.uint8  # the model input, normalized in the graph
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()[INPUT_NAME], first[0][INPUT_NAME])


def test_quantized_graph_is_qdq_with_per_channel_weights(quantized):
    _, path = quantized
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    initializers = {i.name: i for i in model.graph.initializer}
    scales = [
        initializers[n.input[1]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[1] in initializers
    ]
    per_channel = [s for s in scales if len(s.dims) == 1 and s.dims[0] > 1]
    assert per_channel, "no per-channel weight scales"


def _activation_zero_point_types(path) -> set[int]:
    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    return {
        initializers[n.input[2]].data_type
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in initializers
    }


def test_cpu_target_uses_uint8_activations_and_tensorrt_refuses_it(quantized):
    _, path = quantized
    assert _activation_zero_point_types(path) == {onnx.TensorProto.UINT8}
    with pytest.raises(ModelNotReadyError, match="--target tensorrt"):
        _check_symmetric_int8(path)


def test_tensorrt_target_uses_symmetric_int8_activations(quantized, tmp_path):
    spec, _ = quantized
    path = quantize_model(
        spec, calibration_size=4, out_path=tmp_path / "trt.onnx", target="tensorrt"
    )
    assert _activation_zero_point_types(path) == {onnx.TensorProto.INT8}
    _check_symmetric_int8(path)


def test_quantized_model_stays_close_to_fp32(quantized, real_batch):
    spec, path = quantized
    fp32 = onnx_probabilities(get_model(spec.weights_name).onnx_path, real_batch)
    int8 = onnx_probabilities(path, real_batch)
    assert int8.shape == fp32.shape
    assert np.abs(int8 - fp32).max() < 0.2


def test_comparison_table_reports_deltas_and_speedup(data_dir):
    spec = get_model("mobilenet_v2_int8")
    if not spec.onnx_path.exists():
        pytest.skip("int8 ONNX not built; run 'python -m build_engines quantize'")
    result = compare_int8(spec, n_slices=16, batch_size=2, repeats=1)
    assert isinstance(result, Int8Comparison) and result.n_slices == 16
    assert 0.0 <= result.auc_int8 <= 1.0 and result.speedup > 0
    table = format_comparisons([result])
    assert "mobilenet_v2_int8" in table and "speed-up" in table
