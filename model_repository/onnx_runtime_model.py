"""Triton Python-backend model: the model's ``model.onnx`` in ONNX Runtime or OpenVINO, CPU only.

The pytriton-bundled tritonserver carries only the python backend, so the
embedded CPU server runs every model through this one file: each model's
``1/model.py`` is a relative symlink to it (the backend loads the link target
in place). It holds no preprocessing: a slice model's input is the uint8
(N, 3, S, S) model input that ``client.preprocess`` produced, the graph starts
with the normalization and ends in a softmax, so the output is (N, 2)
probabilities. A series model (``<base>_series``, ``max_batch_size: 0``) takes
one series' (1, T, F) features and returns every output its config lists. The
input dtype is whatever the config and graph declare; nothing here depends on it.

The config's parameters choose the runtime and its threading, so tensor names,
batching and thread count have one home whichever runtime runs the graph:

* ``runtime``: ``onnxruntime`` (default) or ``openvino``; OpenVINO reads the
  same ONNX file (fp32 or the QDQ INT8 one) without conversion.
* ``intra_op_thread_count``: threads of one inference, both runtimes.
* ``allow_spinning``: ONNX Runtime only (see model_repository/README.md).
* ``inference_precision_hint``: OpenVINO only, ``f32`` (default) or ``bf16``.
  bf16 is asked for only where the CPU plugin lists BF16 among its
  ``OPTIMIZATION_CAPABILITIES``; elsewhere the model runs in f32 and the log says so.

Triton's dynamic batcher hands a slice model's ``execute`` several requests at
once; they are concatenated into one inference and split back, which is where
batching pays off. An unbatched model's requests (series of different
lengths) run one by one. Tensor names come from the model's config, never from code.
See https://github.com/triton-inference-server/python_backend#usage
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _parameter(config, key, default):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def _onnx_runtime(path, input_name, output_names, threads, config):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads wait for each other on a core someone else may hold (the
    # console, the client): benchmarks/bench_ort_threads.py measures the cost.
    spinning = _parameter(config, "allow_spinning", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    graph_inputs = [i.name for i in session.get_inputs()]
    if graph_inputs != [input_name]:
        raise pb_utils.TritonModelException(
            f"{path} takes {graph_inputs}, the config declares {input_name!r}"
        )
    return lambda batch: dict(
        zip(output_names, session.run(output_names, {input_name: batch}), strict=True)
    )


def _inference_precision(requested, capabilities):
    """The precision to ask OpenVINO for: bf16 only where the CPU plugin lists BF16."""
    if requested not in ("f32", "bf16"):
        raise ValueError(f"inference_precision_hint {requested!r}: f32 or bf16")
    return "bf16" if requested == "bf16" and "BF16" in capabilities else "f32"


def _openvino(path, input_name, output_names, threads, config):
    import openvino as ov

    core = ov.Core()
    requested = _parameter(config, "inference_precision_hint", "f32")
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    try:
        precision = _inference_precision(requested, capabilities)
    except ValueError as e:
        raise pb_utils.TritonModelException(str(e)) from e
    if precision != requested:
        pb_utils.Logger.log_warn(
            f"{config['name']}: this CPU has no BF16 ({', '.join(capabilities)}); running f32"
        )
    # The hint is always explicit: on CPUs with AMX, OpenVINO's default is bf16, and the
    # fp32 variant must stay fp32. LATENCY: one request at a time per instance (execute
    # is synchronous), so one stream over all the threads.
    compiled = core.compile_model(
        str(path),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    graph_inputs = [sorted(i.get_names()) for i in compiled.inputs]
    if len(graph_inputs) != 1 or input_name not in graph_inputs[0]:
        raise pb_utils.TritonModelException(
            f"{path} takes {graph_inputs}, the config declares {input_name!r}"
        )
    pb_utils.Logger.log_info(
        f"{config['name']}: OpenVINO {ov.__version__}, inference precision "
        f"{compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}"
    )
    request = compiled.create_infer_request()

    def run(batch):
        results = request.infer({input_name: batch})
        return {name: results[name] for name in output_names}

    return run


_RUNTIMES = {"onnxruntime": _onnx_runtime, "openvino": _openvino}


class TritonPythonModel:
    """One inference session per model instance, in the runtime the config names."""

    def initialize(self, args):
        """Open ``<model>/<version>/model.onnx`` in the configured runtime and threading."""
        config = json.loads(args["model_config"])
        self._input_name = config["input"][0]["name"]
        self._output_names = [o["name"] for o in config["output"]]
        self._batching = config.get("max_batch_size", 0) > 0
        runtime = _parameter(config, "runtime", "onnxruntime")
        if runtime not in _RUNTIMES:
            raise pb_utils.TritonModelException(
                f"runtime {runtime!r}: one of {', '.join(_RUNTIMES)}"
            )
        self._runtime = runtime
        threads = int(_parameter(config, "intra_op_thread_count", "1"))
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self._run = _RUNTIMES[runtime](path, self._input_name, self._output_names, threads, config)

    def execute(self, requests):
        """Run the queued requests as one batch (unbatched models: one by one); answer each."""
        inputs = [
            pb_utils.get_input_tensor_by_name(r, self._input_name).as_numpy() for r in requests
        ]
        try:
            if self._batching:
                outputs = self._run(np.concatenate(inputs))
                bounds = np.cumsum([len(x) for x in inputs])[:-1]
                answers = [
                    dict(zip(outputs, rows, strict=True))
                    for rows in zip(*(np.split(o, bounds) for o in outputs.values()), strict=True)
                ]
            else:
                answers = [self._run(x) for x in inputs]
        except Exception as e:  # neither runtime raises typed errors; report each one
            error = pb_utils.TritonError(f"{self._runtime} failed: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(answer[name], np.float32))
                    for name in self._output_names
                ]
            )
            for answer in answers
        ]

    def finalize(self):
        """Drop the session so its memory goes back before the stub exits."""
        self._run = None
