"""Command line: classify files or series (in-process or through Triton), server health, Grad-CAM.

python -m client classify --local --model mobilenet_v2 scans/ --csv out.csv
python -m client classify --url localhost:8001 --protocol grpc --model resnet18 --series study/
python -m client health --url localhost:8000
python -m client gradcam --model resnet18 slice.png --out cam.png
"""

from __future__ import annotations

import argparse
import csv
import logging.config
import sys
from pathlib import Path

from client.classify import (
    Classifier,
    LocalClassifier,
    SeriesResult,
    SliceResult,
    classify_files,
    classify_series,
    find_image_files,
)
from client.cli_gradcam import add_gradcam_command
from client.cli_health import add_health_command
from client.errors import HemoTriageError
from client.registry import ModelSpec, get_model, list_models, parse_series_threshold


def _add_classify(subparsers) -> None:
    parser = subparsers.add_parser("classify", help="score image files or series folders")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--local", action="store_true", help="run in-process on the committed weights"
    )
    where.add_argument(
        "--url", help="Triton server, host:port (HTTP 8000, gRPC 8001); several comma-separated"
    )
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--model", default="mobilenet_v2", choices=[s.name for s in list_models()])
    parser.add_argument("--series", action="store_true", help="each folder argument is one series")
    parser.add_argument(
        "--series-rule",
        help="decide series by this recorded rule of the model (max_slice, neighbour_pair,"
        " series_model) instead of its default",
    )
    parser.add_argument(
        "--series-threshold",
        type=_series_threshold,
        help="decide series at this threshold on the rule's score, one a site validated on"
        " its own reviewed series, instead of the recorded one",
    )
    parser.add_argument("--csv", type=Path, help="write results as CSV to this file")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="Triton request timeout")
    parser.add_argument("paths", nargs="+", type=Path, help="files or folders (PNG/JPEG/DICOM)")
    parser.set_defaults(run=_run_classify)


def _series_threshold(text: str) -> float:
    """``--series-threshold`` as a number, or argparse's one-line error."""
    try:
        return parse_series_threshold(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _make_classifier(args: argparse.Namespace, spec: ModelSpec) -> Classifier:
    if args.local:
        base = spec.weights_name or spec.name
        return LocalClassifier(
            get_model(base, spec.series_rule_override, spec.series_threshold_override)
        )
    from client.triton_client import TritonClassifier

    return TritonClassifier(spec, url=args.url, protocol=args.protocol, timeout_s=args.timeout_s)


def _run_classify(args: argparse.Namespace) -> int:
    spec = get_model(args.model, args.series_rule, args.series_threshold)
    classifier = _make_classifier(args, spec)
    run = _run_series if args.series else _run_slices
    return run(args, spec, classifier)


def _label(probability: float, threshold: float) -> str:
    return "hemorrhage" if probability >= threshold else "normal"


def _run_slices(args, spec: ModelSpec, classifier: Classifier) -> int:
    results = classify_files(find_image_files(args.paths), classifier, args.batch_size)
    rows = [_slice_row(r, spec) for r in results]
    _print_table(["path", "model", "probability", "label"], rows)
    if args.csv:
        _write_csv(args.csv, ["path", "model", "probability", "label"], rows)
    return 1 if any(r.error for r in results) else 0


def _slice_row(result: SliceResult, spec: ModelSpec) -> list[str]:
    if result.error:
        return [str(result.path), spec.name, "", f"error: {result.error}"]
    return [
        str(result.path),
        spec.name,
        f"{result.probability:.4f}",
        _label(result.probability, spec.threshold),
    ]


def _run_series(args, spec: ModelSpec, classifier: Classifier) -> int:
    header = ["series", "model", "score", "label", "key_slice", "slices", "failed"]
    rows, failed = [], 0
    for folder in args.paths:
        result = classify_series(folder, classifier, args.batch_size)
        rows.append(_series_row(result, spec))
        failed += sum(1 for s in result.slices if s.error)
    _print_table(header, rows)
    if args.csv:
        _write_csv(args.csv, header, rows)
    return 1 if failed else 0


def _series_row(result: SeriesResult, spec: ModelSpec) -> list[str]:
    n_failed = sum(1 for s in result.slices if s.error)
    if result.series is None:
        return [
            str(result.folder),
            spec.name,
            "",
            "error: no readable slice",
            "",
            "0",
            str(n_failed),
        ]
    return [
        str(result.folder),
        spec.name,
        f"{result.series.score:.4f}",
        _label(result.series.score, result.series.threshold),
        result.key_slice.name,
        str(result.series.scored_slices),
        str(n_failed),
    ]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        sys.stdout.write(
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        )
        sys.stdout.write("\n")


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_classify(subparsers)
    add_health_command(subparsers)
    add_gradcam_command(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except HemoTriageError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
