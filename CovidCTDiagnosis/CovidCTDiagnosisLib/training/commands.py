"""`covidct train`, `covidct evaluate` and `covidct compare`: argparse options and the functions they run.

cli.py wires these in as sub-commands; each `run_*` returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..backbones import BACKBONES
from ..errors import UsageError
from .compare import COMPARISON_MD, PAPER_BASELINES
from .train import BATCHNORM_MODES, SWA_PT, TrainConfig, best_record, check_recipe, read_split, train

DEFAULTS = TrainConfig()


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """Data, recipe and machine options shared by `train` and `compare`."""
    parser.add_argument("--data", action="append", required=True, metavar="CSV",
                        help="labels CSV (path,label,patient_id; paths relative to the CSV), repeatable; "
                             "split 60/10/30 by patient; rows without patient_id are used for training only")
    parser.add_argument("--extra-train", action="append", default=[], metavar="CSV",
                        help="training-only labels CSV (e.g. MosMed-derived slices without patient ids), repeatable")
    parser.add_argument("--backbone", choices=BACKBONES, default=DEFAULTS.backbone, help="DRENet's backbone (default %(default)s)")
    parser.add_argument("--input-size", type=int, default=DEFAULTS.input_size, help="multiple of 64 (default %(default)s)")
    parser.add_argument("--classes", nargs="+", metavar="CLASS",
                        help=f"class names in model order (2 or 3); the first is the positive (disease) class (default "
                             f"{' '.join(DEFAULTS.classes)}; with --init, that model's: others are refused)")
    parser.add_argument("--epochs", type=int, help=f"epochs to train (default {DEFAULTS.epochs}; when continuing a run, "
                        "its own; larger than the run's trains it on)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="learning rate of the heads and navigator")
    parser.add_argument("--backbone-lr-factor", type=float, default=DEFAULTS.backbone_lr_factor,
                        help="the backbone's learning rate as a fraction of --lr (default %(default)s)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default=DEFAULTS.optimizer)
    parser.add_argument("--batchnorm", choices=BATCHNORM_MODES, default=DEFAULTS.batchnorm,
                        help="frozen: keep the pretrained BatchNorm statistics; train: adapt them (default %(default)s)")
    parser.add_argument("--warmup-epochs", type=float, default=DEFAULTS.warmup_epochs,
                        help="linear learning-rate warm-up (default %(default)s)")
    parser.add_argument("--lr-decay-at", type=float, default=DEFAULTS.lr_decay_at,
                        help="step decay x0.1 after this fraction of the epochs (default %(default)s)")
    parser.add_argument("--scanner-augmentation", action="store_true",
                        help="also vary kernel sharpness and image noise, as other scanners give (training/augment.py)")
    parser.add_argument("--max-minutes", type=float, help="stop before an epoch that would end after this many minutes")
    parser.add_argument("--stop-after", type=int, metavar="EPOCH",
                        help="end the run after this epoch, keeping the learning-rate schedule of --epochs (as a time "
                             "budget would stop it; --resume trains on)")
    parser.add_argument("--no-pretrained", action="store_true", help="random backbone instead of ImageNet weights")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=DEFAULTS.threads, help="CPU threads (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_recipe_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run folder: best.pt, state.pt, split.json, history.json, recipe.json (and swa.pt)")
    parser.add_argument("--init", metavar="MODEL", help="fine-tune this model file (keeps its architecture and classes)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out, with the same options (a larger --epochs trains it on); "
                             "without it a folder that holds a run is refused")
    parser.add_argument("--split", metavar="FILE",
                        help="reuse the patient split of a model file or split.json (e.g. to train an ensemble member "
                             "or a baseline on the same patients) instead of a new seeded split")
    parser.add_argument("--swa-from", type=int, default=DEFAULTS.swa_from, metavar="EPOCH",
                        help="also write swa.pt, the average of the weights after each epoch from this one on "
                             "(stochastic weight averaging; BatchNorm statistics recomputed), updated every epoch; "
                             "0: none (default)")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    _add_recipe_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder: one run folder per model, comparison.json, comparison.md (re-run to resume)")
    parser.add_argument("--baselines", nargs="+", choices=BACKBONES, default=list(PAPER_BASELINES), metavar="BACKBONE",
                        help="plain classifiers to train beside DRENet (default: the paper's %(default)s; they need "
                             "torchvision's ImageNet weights in torch's cache (nothing is downloaded); efficientnet_lite0 works offline)")


def _config(args) -> TrainConfig:
    """The recipe of the options, checked (UsageError) before any data is read or anything written."""
    classes = tuple(DEFAULTS.classes if args.classes is None else args.classes)
    if not classes:
        raise UsageError("--classes needs 2 or 3 class names, the disease first")
    config = TrainConfig(
        backbone=args.backbone,
        classes=classes,
        positive_class=classes[0],
        input_size=args.input_size,
        epochs=args.epochs,  # None: the default for a new run, a continued run's own
        batch_size=args.batch_size,
        lr=args.lr,
        backbone_lr_factor=args.backbone_lr_factor,
        optimizer=args.optimizer,
        batchnorm=args.batchnorm,
        warmup_epochs=args.warmup_epochs,
        lr_decay_at=args.lr_decay_at,
        scanner_augmentation=args.scanner_augmentation,
        seed=args.seed,
        pretrained=not args.no_pretrained,
        max_minutes=args.max_minutes,
        stop_after=args.stop_after,
        threads=args.threads,
        swa_from=getattr(args, "swa_from", 0),  # `train` only
    )
    check_recipe(config)
    return config


def run_train(args) -> int:
    config = _config(args)
    if args.init and args.classes is not None:  # a fine-tuned model keeps the classes of the model it starts from
        from ..checkpoint import read_checkpoint

        own = tuple(read_checkpoint(args.init)["config"]["classes"])
        if own != config.classes:
            raise UsageError(f"--classes {' '.join(config.classes)}: the --init model's classes are {' '.join(own)} "
                             "(fine-tuning keeps them; leave --classes out, or train a new model without --init)")
    result = train(args.data, args.out, config, extra_train=args.extra_train, resume=args.resume, init=args.init,
                   split=read_split(args.split) if args.split else None, device=args.device, progress=not args.quiet)
    best = best_record(result.history)
    print(f"best model: {result.best_model} (epoch {best['epoch']}, validation AUC patient {best['val_patient_auc']}, "
          f"image {best['val_image_auc']})")
    if "swa_val_patient_auc" in result.history[-1]:
        last = result.history[-1]
        print(f"averaged model: {result.run_dir / SWA_PT} (epochs {config.swa_from}-{last['epoch']}, validation AUC patient "
              f"{last['swa_val_patient_auc']}, image {last['swa_val_image_auc']})")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", required=True, metavar="FILE", help="model file(s); several = ensemble")
    parser.add_argument("--data", metavar="CSV", nargs="+",
                        help="labels CSV(s) to evaluate on: all rows, or with --split only the split's test patients")
    parser.add_argument("--split", metavar="FROM_MODEL",
                        help="the held-out test patients recorded in this model file (from its own data CSVs unless --data)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json, plots and summary.md")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quiet", action="store_true")


def run_evaluate(args) -> int:
    from ..checkpoint import read_checkpoint
    from .evaluate import SUMMARY_MD, evaluate, load_test_items

    if not (args.split or args.data):
        raise UsageError("nothing to evaluate on: pass --data CSV and/or --split MODEL")
    if args.split:
        classes = read_checkpoint(args.split)["config"]["classes"]
        data = load_test_items(args.split, classes, args.data)
    else:
        data = args.data
    result = evaluate(args.model, data, args.out, device=args.device, progress=not args.quiet)
    if not args.quiet:
        print((Path(args.out) / SUMMARY_MD).read_text())
    else:
        print(json.dumps({"patient_auc": result["patient_level"]["mean"]["positive"]["auc"],
                          "image_auc": result["image_level"]["positive"]["auc"]}))
    return 0


def run_compare(args) -> int:
    from .compare import compare

    compare(args.data, args.out, _config(args), baselines=args.baselines, extra_train=args.extra_train,
            device=args.device, progress=not args.quiet)
    print((Path(args.out) / COMPARISON_MD).read_text())
    return 0
