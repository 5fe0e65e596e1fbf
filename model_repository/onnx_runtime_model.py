"""Triton Python-backend model: ONNX Runtime on the model's ``model.onnx``, CPU only.

The pytriton-bundled tritonserver carries only the python backend, so the
embedded CPU server runs every model through this one file: each model's
``1/model.py`` is a relative symlink to it (the backend loads the link target
in place). It holds no preprocessing: the input is the uint8 (N, 3, S, S) model
input that ``client.preprocess`` produced, the graph starts with the
normalization and ends in a softmax, so the output is (N, 2) probabilities.
The input dtype is whatever the config and graph declare; nothing here depends on it.

Triton's dynamic batcher hands ``execute`` several requests at once; they are
concatenated into one ONNX Runtime call and split back, which is where batching
pays off. Tensor names come from the model's config, never from code.
See https://github.com/triton-inference-server/python_backend#usage
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """One ONNX Runtime session per model instance."""

    def initialize(self, args):
        """Open ``<model>/<version>/model.onnx`` with the threading the config asks for."""
        config = json.loads(args["model_config"])
        self._input_name = config["input"][0]["name"]
        self._output_name = config["output"][0]["name"]
        parameters = config.get("parameters", {})
        threads = int(parameters.get("intra_op_thread_count", {}).get("string_value", "1"))
        spinning = parameters.get("allow_spinning", {}).get("string_value", "1")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning threads wait for each other on a core someone else may hold (the
        # console, the client): benchmarks/bench_ort_threads.py measures the cost.
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        graph_inputs = [i.name for i in self._session.get_inputs()]
        if graph_inputs != [self._input_name]:
            raise pb_utils.TritonModelException(
                f"{path} takes {graph_inputs}, the config declares {self._input_name!r}"
            )

    def execute(self, requests):
        """Run all queued requests as one batch and answer each with its own rows."""
        batches = [
            pb_utils.get_input_tensor_by_name(r, self._input_name).as_numpy() for r in requests
        ]
        sizes = [len(b) for b in batches]
        try:
            probabilities = self._session.run(
                [self._output_name], {self._input_name: np.concatenate(batches)}
            )[0]
        except Exception as e:  # ONNX Runtime raises its own untyped errors; report each one
            error = pb_utils.TritonError(f"ONNX Runtime failed: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        for rows in np.split(probabilities, np.cumsum(sizes)[:-1]):
            tensor = pb_utils.Tensor(self._output_name, np.ascontiguousarray(rows, np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self):
        """Drop the session so its memory goes back before the stub exits."""
        self._session = None
