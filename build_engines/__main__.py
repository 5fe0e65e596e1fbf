r"""Command line for everything that builds models and engines.

python -m build_engines train --model resnet18          # CV + final weights + figures
python -m build_engines evaluate --model resnet18       # figures again, no training
python -m build_engines series --model mobilenet_v2     # series model from the folds' outputs
python -m build_engines ablation --model mobilenet_v2 --name "2.5D input" --candidate-run RUN
python -m build_engines soup --model mobilenet_v2 --member REPORTS WEIGHTS --member ... \
    --report-dir OUT/reports/mobilenet_v2 --weights-dir OUT/weights
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from build_engines.commands import add_engine_commands
from build_engines.data import CONTEXTS, SAMPLINGS, SCALPS
from build_engines.model_card import REPORTS_DIR
from build_engines.train import KEEP_EPOCHS, TrainConfig
from client.constants import REPO_ROOT, WEIGHTS_DIR
from client.errors import HemoTriageError
from client.registry import get_model, list_models


def _train(args: argparse.Namespace) -> int:
    from build_engines.crossval import Teacher, run_training
    from build_engines.data import data_dir_from_env
    from build_engines.error_analysis import analyse_errors

    spec = get_model(args.model)
    config = TrainConfig(
        pretrained=args.pretrained,
        seed=args.seed,
        epochs=args.epochs,
        low_res=args.low_res,
        samples_per_epoch=args.samples_per_epoch,
        distill_weight=args.distill_weight if args.teacher else 0.0,
        hard_negative_boost=args.hard_negative_boost if args.hard_negatives_from else 0.0,
        context=args.context,
        scalp=args.scalp,
        sampling=args.sampling,
        keep=args.keep,
    )
    report_dir = args.report_dir or REPORTS_DIR / spec.name
    weights_dir = args.weights_dir or WEIGHTS_DIR
    teacher = None
    if args.teacher:
        teacher_spec = get_model(args.teacher)
        teacher = Teacher.from_report(teacher_spec, REPORTS_DIR / teacher_spec.name)
    report = run_training(
        spec,
        config,
        data_dir_from_env(),
        report_dir,
        weights_dir,
        args.folds,
        teacher=teacher,
        hard_negatives_from=args.hard_negatives_from,
    )
    logging.getLogger(__name__).info("pooled ROC-AUC %.4f", report["pooled"]["roc_auc"]["value"])
    analyse_errors(report_dir, data_dir_from_env())
    if weights_dir == WEIGHTS_DIR:
        from build_engines.series_check import check_cq500

        check_cq500(spec, data_dir_from_env(), report_dir)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from build_engines.data import data_dir_from_env
    from build_engines.error_analysis import analyse_errors
    from build_engines.report import write_report
    from build_engines.series_check import check_cq500

    spec = get_model(args.model)
    report_dir = args.report_dir or REPORTS_DIR / spec.name
    write_report(spec, report_dir)
    analyse_errors(report_dir, data_dir_from_env())
    check_cq500(spec, data_dir_from_env(), report_dir)
    return 0


def _series(args: argparse.Namespace) -> int:
    from build_engines.data import data_dir_from_env
    from build_engines.series_stage import run_series_stage

    spec = get_model(args.model)
    report_dir = args.report_dir or REPORTS_DIR / spec.name
    report = run_series_stage(
        spec, data_dir_from_env(), report_dir, args.weights_dir or WEIGHTS_DIR
    )
    logging.getLogger(__name__).info("best series score: %s", report["best"])
    return 0


def _ablation(args: argparse.Namespace) -> int:
    from build_engines.ablation import compare_runs, record_ablation
    from build_engines.data import data_dir_from_env

    spec = get_model(args.model)
    report_dir = args.report_dir or REPORTS_DIR / spec.name
    baseline = args.baseline_run
    if baseline is None:
        training = json.loads((report_dir / "training.json").read_text())
        baseline = REPO_ROOT / training["fold_results"]
        if not baseline.is_dir():  # trained on another machine: its committed oof.csv
            baseline = report_dir / "oof.csv"
    comparison = compare_runs(
        spec, data_dir_from_env(), baseline, args.candidate_run, mirror=args.mirror
    )
    path = record_ablation(report_dir, args.name, comparison)
    logging.getLogger(__name__).info(
        "%s on folds %s: written to %s", args.name, comparison["folds"], path
    )
    return 0


def _soup(args: argparse.Namespace) -> int:
    from build_engines.data import data_dir_from_env
    from build_engines.soup import Member, make_soup

    spec = get_model(args.model)
    members = [Member.from_dirs(spec, Path(r), Path(w)) for r, w in args.member]
    report = make_soup(spec, members, data_dir_from_env(), args.report_dir, args.weights_dir)
    logging.getLogger(__name__).info(
        "soup of %d runs: pooled ROC-AUC %.4f", len(members), report["pooled"]["roc_auc"]["value"]
    )
    return 0


def _compare_init(args: argparse.Namespace) -> int:
    from build_engines.data import data_dir_from_env
    from build_engines.init_comparison import compare_initializations

    spec = get_model(args.model)
    config = TrainConfig(epochs=args.epochs, samples_per_epoch=args.samples_per_epoch)
    out = REPORTS_DIR / spec.name / "init_comparison.json"
    compare_initializations(spec, config, data_dir_from_env(), out)
    return 0


def _model_card(args: argparse.Namespace) -> int:
    from build_engines.model_card import write_card

    logging.getLogger(__name__).info("wrote %s", write_card())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m build_engines", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    base_models = [s.name for s in list_models(precision="fp32", runtime="onnxruntime")]

    train = sub.add_parser("train", help="5-fold CV, evaluation, final weights and figures")
    train.add_argument("--model", required=True, choices=base_models)
    train.add_argument("--folds", type=int, default=5)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--epochs", type=int, default=TrainConfig.epochs, help="low-resolution epochs (max)"
    )
    train.add_argument(
        "--low-res",
        type=int,
        default=TrainConfig.low_res,
        help="pixel size of the low-resolution phase (224: every epoch at the serving size)",
    )
    train.add_argument(
        "--samples-per-epoch",
        type=int,
        default=TrainConfig.samples_per_epoch,
        help="slices sampled per epoch (raise it on a GPU)",
    )
    train.add_argument(
        "--pretrained",
        action="store_true",
        help="start mobilenet_v2 from the dequantized ImageNet TFLite weights",
    )
    train.add_argument(
        "--teacher",
        choices=base_models,
        help="distil from this model's last run (its fold models and served weights)",
    )
    train.add_argument(
        "--distill-weight",
        type=float,
        default=0.7,
        help="share of the loss taken from the teacher (with --teacher)",
    )
    train.add_argument(
        "--hard-negatives-from",
        type=Path,
        help="an earlier run's oof.csv: sample the normal slices it scored high more often",
    )
    train.add_argument(
        "--hard-negative-boost",
        type=float,
        default=3.0,
        help="a normal slice with out-of-fold probability p is drawn 1 + boost x p as often",
    )
    train.add_argument(
        "--context",
        choices=CONTEXTS,
        default=TrainConfig.context,
        help="2d: each slice alone; 2.5d: previous, current and next slice as the three channels",
    )
    train.add_argument(
        "--scalp",
        choices=SCALPS,
        default=TrainConfig.scalp,
        help="keep: the whole head; strip: black out everything outside the skull",
    )
    train.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default=TrainConfig.sampling,
        help="slice: every slice of a (source, label) cell equally often; patient: every patient",
    )
    train.add_argument(
        "--keep",
        choices=KEEP_EPOCHS,
        default=TrainConfig.keep,
        help="lowest_loss: early stopping on held-out patients; last: the full schedule",
    )
    train.add_argument("--report-dir", type=Path)
    train.add_argument("--weights-dir", type=Path)
    train.set_defaults(run=_train)

    evaluate = sub.add_parser("evaluate", help="metrics and figures from a run's oof.csv")
    evaluate.add_argument("--model", required=True, choices=base_models)
    evaluate.add_argument("--report-dir", type=Path)
    evaluate.set_defaults(run=_evaluate)

    series = sub.add_parser(
        "series",
        help="nested comparison of series scores (slice maximum, neighbour pair, series models)",
    )
    series.add_argument("--model", required=True, choices=base_models)
    series.add_argument("--report-dir", type=Path)
    series.add_argument("--weights-dir", type=Path, help="whose sidecar records the rule")
    series.set_defaults(run=_series)

    compare = sub.add_parser(
        "compare-init", help="ImageNet vs random start on one fold, equal budget"
    )
    compare.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2"])
    compare.add_argument("--epochs", type=int, default=4)
    compare.add_argument("--samples-per-epoch", type=int, default=TrainConfig.samples_per_epoch)
    compare.set_defaults(run=_compare_init)

    ablation = sub.add_parser(
        "ablation", help="a training change against the served run, on the same folds"
    )
    ablation.add_argument("--model", required=True, choices=base_models)
    ablation.add_argument("--name", required=True, help="the change, as the model card names it")
    ablation.add_argument(
        "--candidate-run",
        type=Path,
        required=True,
        action="append",
        help="the changed run's .cache/runs folder (or oof.csv); given more than once, the"
        " candidate is the runs' ensemble (logits averaged)",
    )
    ablation.add_argument(
        "--baseline-run",
        type=Path,
        help="a run folder or its oof.csv; default: the run of the report's training.json,"
        " else the report's oof.csv",
    )
    ablation.add_argument(
        "--mirror",
        action="store_true",
        help="score the candidate's fold models on each slice and its mirror image, averaged",
    )
    ablation.add_argument(
        "--report-dir", type=Path, help="whose training.json and ablations.json; default served"
    )
    ablation.set_defaults(run=_ablation)

    soup = sub.add_parser(
        "soup", help="one network averaging runs' weights, fold by fold: a run of its own"
    )
    soup.add_argument("--model", required=True, choices=base_models)
    soup.add_argument(
        "--member",
        nargs=2,
        action="append",
        required=True,
        metavar=("REPORT_DIR", "WEIGHTS_DIR"),
        help="a finished run, as train's --report-dir and --weights-dir; give two or more",
    )
    soup.add_argument("--report-dir", type=Path, required=True)
    soup.add_argument("--weights-dir", type=Path, required=True)
    soup.set_defaults(run=_soup)

    card = sub.add_parser("model-card", help="render MODEL_CARD.md from the reports")
    card.set_defaults(run=_model_card)
    add_engine_commands(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.run(args)
    except HemoTriageError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
