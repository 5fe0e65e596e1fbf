"""Engine subcommands of ``python -m build_engines``: export, quantize, variants, serve and more.

``build_engines/__main__.py`` registers them all with one call:

    add_engine_commands(sub)      # sub = parser.add_subparsers(...)

    python -m build_engines export                       # fp32 ONNX + parity, every model
    python -m build_engines quantize                     # INT8 QDQ ONNX + accuracy/speed table
    python -m build_engines variants                     # CPU variants vs fp32: accuracy, speed
    python -m build_engines build-trt --model resnet18   # TensorRT plan (GPU only)
    python -m build_engines serve --http-port 8000       # embedded CPU Triton until Ctrl-C
    python -m build_engines cam-eval --model resnet18    # Grad-CAM pointing game

Each handler takes the parsed arguments and returns the exit status; typed
errors propagate to ``__main__``, which prints them and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from build_engines.model_card import REPORTS_DIR
from client.cli_gradcam import METHODS
from client.constants import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT
from client.registry import get_model, list_models


def add_engine_commands(sub) -> None:
    """Register export, quantize, variants, build-trt, serve and cam-eval on ``sub``."""
    fp32 = _names(precision="fp32", runtime="onnxruntime")
    int8 = _names(precision="int8", runtime="onnxruntime")
    every = _names()

    export = sub.add_parser("export", help="ONNX export with softmax, checker and parity")
    export.add_argument("--model", action="append", choices=fp32, help="repeatable; default all")
    export.add_argument("--parity-images", type=int, default=32, help="real slices compared")
    export.set_defaults(run=_export)

    quantize = sub.add_parser("quantize", help="INT8 static quantization (QDQ, per-channel)")
    quantize.add_argument("--model", action="append", choices=int8, help="repeatable; default all")
    quantize.add_argument("--calibration-size", type=int, default=128, help="calibration slices")
    quantize.add_argument("--evaluation-size", type=int, default=256, help="held-out slices")
    quantize.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for timing")
    quantize.add_argument(
        "--target", choices=["cpu", "tensorrt"], default="cpu", help="runtime of the INT8 file"
    )
    quantize.add_argument("--skip-compare", action="store_true", help="no fp32-vs-int8 table")
    quantize.set_defaults(run=_quantize)

    variants = sub.add_parser(
        "variants", help="every CPU variant vs fp32 ONNX Runtime: accuracy, decisions, speed"
    )
    variants.add_argument("--model", action="append", choices=fp32, help="base; default all")
    variants.add_argument("--evaluation-size", type=int, default=256, help="held-out slices")
    variants.add_argument("--threads", type=int, default=2, help="inference threads, every row")
    variants.add_argument("--repeats", type=int, default=20, help="timed calls per batch size")
    variants.set_defaults(run=_variants)

    trt = sub.add_parser("build-trt", help="TensorRT FP16/INT8 plan for this GPU")
    # OpenVINO entries have no plan: the GPU image runs them in its openvino backend.
    plans = _names(runtime="onnxruntime")
    trt.add_argument("--model", action="append", choices=plans, help="repeatable; default all")
    trt.add_argument("--builder", choices=["tensorrt", "torch2trt"], default="tensorrt")
    trt.add_argument("--max-batch-size", type=int, help="profile max; default the registry's")
    trt.set_defaults(run=_build_trt)

    serve = sub.add_parser("serve", help="run the embedded CPU Triton until Ctrl-C")
    serve.add_argument("--http-port", type=int, help=f"default {DEFAULT_HTTP_PORT}")
    serve.add_argument("--grpc-port", type=int, help=f"default {DEFAULT_GRPC_PORT}")
    serve.add_argument("--metrics-port", type=int, help=f"default {DEFAULT_METRICS_PORT}")
    serve.add_argument("--model-config-name", help="configs/<name>.pbtxt; default cpu")
    serve.add_argument(
        "--model",
        action="append",
        choices=every,
        help="repeatable, with the series model its series rule needs; default all",
    )
    serve.add_argument("--startup-timeout-s", type=float, help="default 180")
    serve.set_defaults(run=_serve)

    cam = sub.add_parser("cam-eval", help="Grad-CAM pointing game on boxed phe_sich slices")
    cam.add_argument("--model", action="append", choices=every, help="repeatable; default fp32")
    cam.add_argument("--method", choices=list(METHODS), default="gradcam")
    cam.add_argument("--limit", type=int, help="only the first N boxed slices")
    cam.add_argument("--device", default="cpu")
    cam.set_defaults(run=_cam_eval)


def _names(precision: str | None = None, runtime: str | None = None) -> list[str]:
    return [s.name for s in list_models(precision, runtime)]


def _export(args: argparse.Namespace) -> int:
    from build_engines.export_onnx import export_and_verify

    for name in args.model or _names(precision="fp32", runtime="onnxruntime"):
        result = export_and_verify(get_model(name), args.parity_images)
        sys.stdout.write(
            f"{result.model:<14} {result.onnx_path}  max |Δprob| vs torch on "
            f"{result.n_images} slices: {result.max_abs_diff:.2e}\n"
        )
        if result.series_onnx_path is not None:
            sys.stdout.write(
                f"{'':<14} {result.series_onnx_path}  max |Δprob| vs torch on "
                f"series of 1-250 slices: {result.series_max_abs_diff:.2e}\n"
            )
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from build_engines.quantize import compare_int8, format_comparisons, quantize_model

    rows = []
    for name in args.model or _names(precision="int8", runtime="onnxruntime"):
        spec = get_model(name)
        quantize_model(spec, args.calibration_size, target=args.target)
        if not args.skip_compare:
            row = compare_int8(spec, args.evaluation_size, threads=args.threads)
            rows.append(row)
            _write_report(
                spec.weights_name,
                "int8.json",
                asdict(row) | {"auc_delta": row.auc_delta, "speedup": row.speedup},
            )
    if rows:
        sys.stdout.write(format_comparisons(rows) + "\n")
    return 0


def _variants(args: argparse.Namespace) -> int:
    from build_engines.variants import compare_variants, fastest_within, format_variants

    for name in args.model or _names(precision="fp32", runtime="onnxruntime"):
        report = compare_variants(get_model(name), args.evaluation_size, args.threads, args.repeats)
        _write_report(name, "variants.json", report)
        sys.stdout.write(
            f"{name}: {report['n_slices']} held-out slices, {report['n_series']} ct_ich_dev"
            f" series, {report['threads']} threads, load {report['load_average']}\n"
            f"{format_variants(report)}\n"
            f"fastest within 0.01 ROC-AUC, series no worse: {fastest_within(report)}\n"
        )
    return 0


def _build_trt(args: argparse.Namespace) -> int:
    from build_engines.tensorrt import build

    for name in args.model or _names(runtime="onnxruntime"):
        sys.stdout.write(f"{build(name, args.builder, args.max_batch_size)}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from build_engines.serve import ServeSettings, serve, with_series_models

    settings = ServeSettings.from_env(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_config_name=args.model_config_name,
        models=with_series_models(tuple(args.model)) if args.model else None,
        startup_timeout_s=args.startup_timeout_s,
    )
    return serve(settings)


def _cam_eval(args: argparse.Namespace) -> int:
    from build_engines.cam_eval import localization_score

    explainer = METHODS[args.method]
    for name in args.model or _names(precision="fp32", runtime="onnxruntime"):
        spec = get_model(name)
        r = localization_score(spec, explainer, args.limit, device=args.device)
        facts = {"method": args.method, "target_layer": spec.cam_target_layer}
        if args.limit is None:
            _write_report(name, "gradcam.json", asdict(r) | facts | {"hit_rate": r.hit_rate})
        sys.stdout.write(
            f"{r.model:<14} {args.method} on {spec.cam_target_layer}: peak inside a box on "
            f"{r.hits}/{r.n_slices} slices "
            f"= {r.hit_rate:.3f} (chance {r.chance_rate:.3f})\n"
        )
    return 0


def _write_report(model: str, filename: str, result: dict) -> None:
    """Keep a measured result beside the model's cross-validation report, for the model card."""
    path = REPORTS_DIR / model / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
