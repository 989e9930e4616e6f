"""`covidct compare`: the paper's Table 1 on your data: DRENet against plain classifiers, one split.

Trains DRENet and each baseline (baselines.py) with the same recipe, the same prepared images,
augmentation and patient split (the split of the first model trained, reused by all), then
scores every model on the same held-out test patients. Writes, in the output folder, one run
folder per model, `comparison.json` and `comparison.md` (our table, with the paper's published
figures beside it). Re-running continues each existing run as `train --resume` would (same
options, or it refuses before training anything; a larger epoch count trains it on; a complete
run is reused), and says on stderr which it did.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..backbones import build_backbone
from ..drenet import DRENetConfig
from .datasets import load_split, prepare_set, read_labels, subset
from .evaluate import evaluate
from .train import (BEST_PT, HISTORY_JSON, SPLIT_JSON, TrainConfig, best_record, check_recipe, continuation, holds_run,
                    requested_recipe, train)

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
PAPER_BASELINES = ("resnet50", "densenet121", "vgg16")

# The paper's published figures for DRENet (Song et al. 2021, abstract; their own hospital CT:
# 88 COVID-19, 100 bacterial-pneumonia and 86 healthy people). Table 1's baseline rows could not
# be read offline when this was written; add them here (same keys) to print them beside ours.
PAPER_TABLE = {
    "caption": "Song et al. 2021 (abstract): DRENet on their hospital CT, not on this data",
    "rows": {
        "DRENet, COVID-19 vs bacterial pneumonia": {"auc": 0.95, "recall": 0.96, "precision": 0.79},
        "DRENet, COVID-19 vs bacterial pneumonia and healthy": {"auc": None, "recall": 0.93, "precision": 0.86},
    },
}


def run_name(model: str, backbone: str) -> str:
    return f"{model}-{backbone}"


def compare(data, out_dir, config: TrainConfig, *, baselines=PAPER_BASELINES, extra_train=(), device="auto",
            progress=True) -> dict:
    """Train DRENet (config.backbone) and a plain classifier per name in `baselines`; test all on one split."""
    check_recipe(config)
    runs = [("drenet", config.backbone)] + [("plain", b) for b in baselines]
    if config.pretrained:  # fail before hours of training, not after: fetch (or find cached) every ImageNet start
        for backbone in dict.fromkeys(b for _, b in runs):
            build_backbone(backbone, pretrained=True)
    out = Path(out_dir)  # created by the first training run: bad data leaves nothing behind
    configs = {run_name(m, b): replace(config, model=m, backbone=b) for m, b in runs}
    existing, complete = set(), set()  # every existing run is checked before any is trained
    for name, cfg in configs.items():
        if holds_run(out / name):
            run_cfg, _, state, _ = continuation(out / name, requested_recipe(cfg, data, extra_train, None)[0])
            existing.add(name)
            if state["epoch"] == run_cfg.epochs:
                complete.add(name)
    split, rows = None, []
    for (model, backbone), (name, cfg) in zip(runs, configs.items()):
        run_dir = out / name
        began = time.monotonic()
        train(data, run_dir, cfg, extra_train=extra_train, resume=name in existing, split=split, device=device,
              progress=progress)
        minutes = None if name in complete else (time.monotonic() - began) / 60
        split = split or load_split(run_dir / SPLIT_JSON)
        history = json.loads((run_dir / HISTORY_JSON).read_text())
        rows.append({"run": run_dir.name, "model": model, "backbone": backbone, "epochs_trained": len(history),
                     "best_epoch": best_record(history)["epoch"],
                     "train_minutes_this_call": minutes,
                     "train_seconds": round(sum(r["seconds"] for r in history), 1)})

    items = [it for p in data for it in read_labels(p, config.classes)]
    window = (DRENetConfig.window_level, DRENetConfig.window_width)  # baselines read the same window
    test = prepare_set(subset(items, split, "test"), config.classes, config.input_size, progress, window)
    for row in rows:
        result = evaluate(out / row["run"] / BEST_PT, test, out / row["run"] / "test", device=device)
        row["image"] = result["image_level"]["positive"] | {"accuracy": result["image_level"]["accuracy"]}
        row["patient_mean"] = result["patient_level"]["mean"]["positive"] | {"accuracy": result["patient_level"]["mean"]["accuracy"]}
    report = {
        "data": [str(Path(p).resolve()) for p in data],
        "extra_train": [str(Path(p).resolve()) for p in extra_train],
        "test_images": len(test),
        "test_patients": len(set(test.patients)),
        "positive_class": config.positive_class,
        "recipe": {k: v for k, v in asdict(config).items() if k not in ("model", "backbone", "data", "extra_train")},
        "rows": rows,
        "paper": PAPER_TABLE,
    }
    (out / COMPARISON_JSON).write_text(json.dumps(report, indent=1))
    (out / COMPARISON_MD).write_text(comparison_markdown(report))
    return report


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def comparison_markdown(report: dict) -> str:
    lines = [
        "# DRENet against plain classifiers (same split, same recipe)",
        "",
        f"Test: {report['test_images']} images of {report['test_patients']} held-out patients; positive class "
        f"{report['positive_class']}. F1 = 2PR/(P+R); F1 (eq. 5) = (P+R)/2, the paper's definition.",
        "",
        "| model | backbone | level | AUC | recall | precision | specificity | F1 | F1 (eq. 5) | accuracy | epochs (best) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        for level, key in (("image", "image"), ("patient (mean)", "patient_mean")):
            m = r[key]
            lines.append(
                f"| {'DRENet' if r['model'] == 'drenet' else 'plain classifier'} | {r['backbone']} | {level} | {_f(m['auc'])} "
                f"| {_f(m['recall'])} | {_f(m['precision'])} | {_f(m['specificity'])} | {_f(m['f1'])} "
                f"| {_f(m['f1_paper_eq5'])} | {_f(m['accuracy'])} | {r['epochs_trained']} ({r['best_epoch']}) |"
            )
    paper = report["paper"]
    if paper["rows"]:
        lines += ["", f"## {paper['caption']}", "", "| model and task | AUC | recall | precision |", "|---|---|---|---|"]
        for name, m in paper["rows"].items():
            lines.append(f"| {name} | {_f(m.get('auc'))} | {_f(m.get('recall'))} | {_f(m.get('precision'))} |")
    return "\n".join(lines) + "\n"
