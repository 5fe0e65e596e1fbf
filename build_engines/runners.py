"""In-process runners of a registry entry's ``model.onnx``, as the CPU server runs it.

The accuracy and speed comparisons (``quantize``, ``variants``) score every
entry the way the embedded Triton does: ONNX Runtime for the ``onnxruntime``
entries, OpenVINO with the entry's inference precision for the ``openvino``
ones, with the settings of ``model_repository/onnx_runtime_model.py`` and the
CPU configs (ONNX Runtime threads that do not spin; OpenVINO's explicit
precision hint and one latency stream; ``threads`` inference threads).

    runner = runner_for(get_model("mobilenet_v2_openvino_bf16"), threads=2)
    runner.precision                 # "bf16", or "f32" where the CPU has no BF16
    predict(runner, batch)           # P(hemorrhage) per slice
    median_latency_ms({"bf16": runner}, batch[:8], repeats=20)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from client.constants import INPUT_NAME, OUTPUT_NAME
from client.errors import ModelNotReadyError
from client.registry import ModelSpec


@dataclass(frozen=True)
class Runner:
    """One compiled model: ``run`` maps a uint8 (N, 3, S, S) batch to (N, 2) probabilities.

    Attributes:
        run: The inference call.
        precision: What the runtime computes in: ``f32``, ``bf16`` (as OpenVINO
            reports it after compiling) or ``int8`` (the QDQ graph).
    """

    run: Callable[[np.ndarray], np.ndarray]
    precision: str


def runner_for(spec: ModelSpec, threads: int, spinning: bool = False) -> Runner:
    """Open ``spec``'s built ONNX in its runtime (``threads`` 0: ONNX Runtime takes every core).

    ``spinning`` lets ONNX Runtime's threads spin between calls, as its default
    does: the in-process ceiling of the serving benchmarks on a quiet machine.
    The served configs and the comparisons here turn it off.

    Raises:
        ModelNotReadyError: the ONNX file has not been built.
    """
    if not spec.onnx_path.exists():
        raise ModelNotReadyError(
            f"{spec.onnx_path} missing; run 'python -m build_engines export' and 'quantize'"
        )
    if spec.runtime == "openvino":
        return _openvino(spec, threads)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # As the served config: threads sleep, not spin, between calls (model_repository/README.md);
    # spinning would also steal the cores of the next runner when runners take turns.
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    session = ort.InferenceSession(str(spec.onnx_path), options, providers=["CPUExecutionProvider"])
    precision = "int8" if spec.precision == "int8" else "f32"
    return Runner(lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0], precision)


def _openvino(spec: ModelSpec, threads: int) -> Runner:
    import openvino as ov

    # bf16 is asked for as the served config asks; OpenVINO reports what it compiled,
    # which is f32 on a CPU without BF16.
    compiled = ov.Core().compile_model(
        str(spec.onnx_path),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": "bf16" if spec.precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        },
    )
    request = compiled.create_infer_request()
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if spec.precision == "int8":
        precision = "int8"
    return Runner(lambda batch: request.infer({INPUT_NAME: batch})[OUTPUT_NAME], precision)


def predict(runner: Runner, batch: np.ndarray, chunk: int = 32) -> np.ndarray:
    """P(hemorrhage) of every slice of ``batch``, ``chunk`` slices per call."""
    parts = [runner.run(batch[i : i + chunk])[:, 1] for i in range(0, len(batch), chunk)]
    return np.concatenate(parts)


def median_latency_ms(
    runners: dict[str, Runner], batch: np.ndarray, repeats: int
) -> dict[str, float]:
    """Median wall time per runner of ``repeats`` calls on ``batch``, after one warm-up each.

    The runners take turns call by call, so a change in the machine's load (other
    processes on the same cores) slows them alike and their ratios hold.
    """
    for runner in runners.values():
        runner.run(batch)  # warm-up: allocations, kernel choice
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.run(batch)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(t)) for name, t in times.items()}
