"""`covidct train` and `covidct evaluate`: argparse options and the functions they run.

cli.py wires these in as sub-commands; each `run_*` returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..backbones import BACKBONES
from .train import TrainConfig, train

DEFAULTS = TrainConfig()


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="CSV",
                        help="labels CSV (path,label,patient_id; paths relative to the CSV), repeatable; "
                             "split 60/10/30 by patient; rows without patient_id are used for training only")
    parser.add_argument("--extra-train", action="append", default=[], metavar="CSV",
                        help="training-only labels CSV (e.g. MosMed-derived slices without patient ids), repeatable")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder: best.pt, state.pt, split.json, history.json")
    parser.add_argument("--init", metavar="MODEL", help="fine-tune this model file (keeps its architecture and classes)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--backbone", choices=BACKBONES, default=DEFAULTS.backbone)
    parser.add_argument("--input-size", type=int, default=DEFAULTS.input_size, help="multiple of 64 (default %(default)s)")
    parser.add_argument("--classes", nargs="+", default=list(DEFAULTS.classes), metavar="CLASS",
                        help="class names in model order (2 or 3); the first is the positive (disease) class")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="learning rate of the heads and navigator")
    parser.add_argument("--backbone-lr-factor", type=float, default=DEFAULTS.backbone_lr_factor,
                        help="the backbone's learning rate as a fraction of --lr (default %(default)s)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default=DEFAULTS.optimizer)
    parser.add_argument("--max-minutes", type=float, help="stop before an epoch that would end after this many minutes")
    parser.add_argument("--no-pretrained", action="store_true", help="random backbone instead of ImageNet weights")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=DEFAULTS.threads, help="CPU threads (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_train(args) -> int:
    config = TrainConfig(
        backbone=args.backbone,
        classes=tuple(args.classes),
        positive_class=args.classes[0],
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        backbone_lr_factor=args.backbone_lr_factor,
        optimizer=args.optimizer,
        seed=args.seed,
        pretrained=not args.no_pretrained,
        max_minutes=args.max_minutes,
        threads=args.threads,
    )
    result = train(args.data, args.out, config, extra_train=args.extra_train, resume=args.resume, init=args.init,
                   device=args.device, progress=not args.quiet)
    best = max(result.history, key=lambda r: (r["val_patient_auc"] or 0.0, r["val_image_auc"] or 0.0))
    print(f"best model: {result.best_model} (epoch {best['epoch']}, validation AUC patient {best['val_patient_auc']}, "
          f"image {best['val_image_auc']})")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", required=True, metavar="FILE", help="model file(s); several = ensemble")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="CSV", help="labels CSV to evaluate on (all rows)")
    source.add_argument("--split", metavar="FROM_MODEL", help="the held-out test patients recorded in this model file")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json, plots and summary.md")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quiet", action="store_true")


def run_evaluate(args) -> int:
    from ..checkpoint import read_checkpoint
    from .evaluate import SUMMARY_MD, evaluate, load_test_items

    if args.split:
        classes = read_checkpoint(args.model[0])["config"]["classes"]
        data = load_test_items(args.split, classes)
    else:
        data = args.data
    result = evaluate(args.model, data, args.out, device=args.device, progress=not args.quiet)
    if not args.quiet:
        print((Path(args.out) / SUMMARY_MD).read_text())
    else:
        print(json.dumps({"patient_auc": result["patient_level"]["mean"]["positive"]["auc"],
                          "image_auc": result["image_level"]["positive"]["auc"]}))
    return 0
