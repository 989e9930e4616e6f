"""Metrics and plots for a trained model (or an ensemble) on labelled slices.

Image level: every slice scored on its own. Patient level: slice probabilities aggregated per
patient by each method of aggregation.py (the mean, the paper's). Reported per class (one
class against the rest) and macro-averaged; the positive class's numbers are the headline. F1 is
the standard 2PR/(P+R); the paper's Eq. 5 defines "F1" as (P+R)/2, reported separately as
`f1_paper_eq5` so the two are never confused. Several model files form an ensemble: their
slice probabilities are averaged. 95 % confidence intervals come from the percentile bootstrap
over patients (Efron & Tibshirani 1993): patients are resampled, each with all its slices, so
the slices of one patient never count as independent evidence.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from ..aggregation import METHODS as AGGREGATIONS, aggregate
from ..checkpoint import check_ensemble, file_sha256, load_model, read_checkpoint
from ..inference import resolve_device
from ..preprocessing import to_three_channels
from ..errors import InputNotFoundError, ModelFileError, NoLungsError, UnreadableInputError
from ..outputs import check_writable
from .baselines import is_baseline_file, load_baseline
from .datasets import PreparedSet, prepare_set, read_labels, subset

CALIBRATION_BINS = 10
EVAL_BATCH = 16
METRICS_JSON = "metrics.json"
PREDICTIONS_CSV = "predictions.csv"
SUMMARY_MD = "summary.md"
ROC_PNG = "roc.png"
CONFUSION_PNG = "confusion.png"
RELIABILITY_PNG = "reliability.png"
BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def binary_metrics(truth: np.ndarray, score: np.ndarray, predicted: np.ndarray) -> dict:
    """One class against the rest: truth/predicted bool, score = that class's probability."""
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    tp = int(np.sum(truth & predicted))
    fp = int(np.sum(~truth & predicted))
    tn = int(np.sum(~truth & ~predicted))
    fn = int(np.sum(truth & ~predicted))
    recall, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    both = recall is not None and precision is not None
    return {
        "auc": float(roc_auc_score(truth, score)) if 0 < truth.sum() < truth.size else None,
        "recall": recall,
        "precision": precision,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * precision * recall, precision + recall) if both else None,
        "f1_paper_eq5": (precision + recall) / 2 if both else None,
        "accuracy": _ratio(tp + tn, truth.size),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def compute_metrics(labels: np.ndarray, probs: np.ndarray, classes, positive_class: str) -> dict:
    """labels (N,) class indices, probs (N, n) -> per-class, macro and positive-class metrics, accuracy."""
    labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
    predicted = probs.argmax(1)
    per_class = {c: binary_metrics(labels == i, probs[:, i], predicted == i) for i, c in enumerate(classes)}
    keys = ("auc", "recall", "precision", "specificity", "f1", "f1_paper_eq5")
    macro = {}
    for key in keys:
        values = [m[key] for m in per_class.values() if m[key] is not None]
        macro[key] = float(np.mean(values)) if values else None
    return {
        "n": int(labels.size),
        "accuracy": float(np.mean(predicted == labels)) if labels.size else None,
        "positive_class": positive_class,
        "positive": per_class[positive_class],
        "per_class": per_class,
        "macro": macro,
        "confusion_matrix": confusion_matrix(labels, predicted, labels=list(range(len(classes)))).tolist(),
    }


def patient_probabilities(probs: np.ndarray, labels: np.ndarray, patients, classes, positive_class: str, method: str):
    """Aggregate slices per patient -> (patient ids, patient labels (majority), (P, n) probabilities)."""
    groups = defaultdict(list)
    for i, pid in enumerate(patients):
        groups[pid].append(i)
    ids = sorted(groups)
    out_labels, out_probs = [], []
    for pid in ids:
        idx = groups[pid]
        out_labels.append(np.bincount(labels[idx], minlength=len(classes)).argmax())
        agg = aggregate(probs[idx], classes, positive_class, method)
        out_probs.append([agg[c] for c in classes])
    return ids, np.array(out_labels, np.int64), np.array(out_probs)


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, patients, classes, positive_class: str,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """CI_LEVEL percentile intervals of the positive class's headline figures, patients resampled.

    labels (N,) class indices, probs (N, n) slice probabilities, patients (N,) ids. Returns
    {figure: [low, high]} for image_auc, patient_auc, patient_sensitivity and patient_specificity
    (patient level: the mean aggregation; the operating point is the label's own, the class of
    highest probability). A figure undefined in a resample (one class only) is left out of it.
    """
    pos = list(classes).index(positive_class)
    ids, p_labels, p_probs = patient_probabilities(probs, labels, patients, classes, positive_class, "mean")
    patient_of = np.asarray(patients, dtype=object)
    rows = {pid: np.flatnonzero(patient_of == pid) for pid in ids}
    p_truth, p_score, p_called = p_labels == pos, p_probs[:, pos], p_probs.argmax(1) == pos
    rng = np.random.default_rng(seed)
    draws = defaultdict(list)
    for _ in range(resamples):
        pick = rng.integers(0, len(ids), len(ids))
        truth, score, called = p_truth[pick], p_score[pick], p_called[pick]
        if truth.all() or not truth.any():
            continue
        draws["patient_auc"].append(roc_auc_score(truth, score))
        draws["patient_sensitivity"].append(called[truth].mean())
        draws["patient_specificity"].append((~called[~truth]).mean())
        idx = np.concatenate([rows[ids[i]] for i in pick])
        draws["image_auc"].append(roc_auc_score(labels[idx] == pos, probs[idx, pos]))
    tail = 100 * (1 - CI_LEVEL) / 2
    return {k: [float(v) for v in np.percentile(d, [tail, 100 - tail])] for k, d in sorted(draws.items())}


def reliability(truth: np.ndarray, score: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Equal-width bins of predicted probability: mean prediction, observed frequency, count; and the ECE."""
    truth, score = np.asarray(truth, float), np.asarray(score, float)
    which = np.minimum((score * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            conf, freq = float(score[sel].mean()), float(truth[sel].mean())
            rows.append({"mean_predicted": conf, "observed": freq, "count": int(sel.sum())})
            ece += sel.sum() / score.size * abs(conf - freq)
    return {"bins": rows, "ece": float(ece)}


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = EVAL_BATCH,
            masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S) uint8 prepared images -> softmax of the image-level prediction and of the backbone's head, each (N, n).

    masks: (N, S, S) bool lung masks of the inputs: DRENet then chooses its regions over the lungs, as in use."""
    model = model.eval().to(device, memory_format=torch.channels_last)
    main, backbone = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(to_three_channels(images[i : i + batch_size].astype(np.float32) / 255.0))
        lung = None if masks is None else torch.from_numpy(np.ascontiguousarray(masks[i : i + batch_size])).to(device)
        out = model(x.to(device).contiguous(memory_format=torch.channels_last), lung_mask=lung)
        main.append(torch.softmax(out.logits.float(), 1).cpu().numpy())
        backbone.append(torch.softmax(out.global_logits.float(), 1).cpu().numpy())
    return np.concatenate(main), np.concatenate(backbone)


def score_set(labels, probs, patients, classes, positive_class) -> dict:
    """Image-level and patient-level (each aggregation) metrics of one set of slice probabilities."""
    result = {"image_level": compute_metrics(labels, probs, classes, positive_class), "patient_level": {}}
    for method in AGGREGATIONS:
        _, p_labels, p_probs = patient_probabilities(probs, labels, patients, classes, positive_class, method)
        result["patient_level"][method] = compute_metrics(p_labels, p_probs, classes, positive_class)
    return result


def _plots(out_dir: Path, labels, probs, patients, classes, positive_class, calibration) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = list(classes).index(positive_class)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    curves = {"image": (labels == pos, probs[:, pos])}
    for method in AGGREGATIONS:
        _, p_labels, p_probs = patient_probabilities(probs, labels, patients, classes, positive_class, method)
        curves[f"patient ({method})"] = (p_labels == pos, p_probs[:, pos])
    for name, (truth, score) in curves.items():
        if 0 < truth.sum() < truth.size:
            fpr, tpr, _ = roc_curve(truth, score)
            ax.plot(fpr, tpr, label=f"{name}: AUC {roc_auc_score(truth, score):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="recall (sensitivity)", title=f"ROC, positive class {positive_class}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / ROC_PNG, dpi=100)
    plt.close(fig)

    cm = confusion_matrix(labels, probs.argmax(1), labels=list(range(len(classes))))
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    for (r, c), v in np.ndenumerate(cm):
        ax.text(c, r, str(v), ha="center", va="center", color="black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="image level")
    fig.tight_layout()
    fig.savefig(out_dir / CONFUSION_PNG, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 4))
    bins = calibration["bins"]
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], "o-")
    ax.set(xlabel=f"predicted P({positive_class})", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability (image level), ECE {calibration['ece']:.3f}")
    fig.tight_layout()
    fig.savefig(out_dir / RELIABILITY_PNG, dpi=80)
    plt.close(fig)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _summary(result: dict) -> str:
    lines = [
        f"# Evaluation: {', '.join(result['models'])}",
        "",
        f"{result['n_images']} images from {result['n_patients']} patients; positive class {result['positive_class']}.",
        "F1 = 2PR/(P+R); F1 (eq. 5) = (P+R)/2 as defined in the paper.",
        "",
        "| level | AUC | recall | precision | specificity | F1 | F1 (eq. 5) | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("image", result["image_level"])] + [(f"patient ({m})", result["patient_level"][m]) for m in AGGREGATIONS]
    rows.append(("image, backbone head only", result["backbone_head"]["image_level"]))
    rows.append(("patient (mean), backbone head only", result["backbone_head"]["patient_level"]["mean"]))
    for name, m in rows:
        p = m["positive"]
        lines.append(
            f"| {name} | {_fmt(p['auc'])} | {_fmt(p['recall'])} | {_fmt(p['precision'])} | {_fmt(p['specificity'])} "
            f"| {_fmt(p['f1'])} | {_fmt(p['f1_paper_eq5'])} | {_fmt(m['accuracy'])} |"
        )
    ci = result["ci95"]
    lines += ["", f"{100 * CI_LEVEL:.0f} % confidence intervals (bootstrap over patients, {BOOTSTRAP_RESAMPLES} resamples): "
              + "; ".join(f"{k.replace('_', ' ')} {lo:.3f}-{hi:.3f}" for k, (lo, hi) in ci.items()) + ".",
              "", f"Calibration (image level): ECE {result['calibration']['ece']:.3f} ({CALIBRATION_BINS} bins).", ""]
    return "\n".join(lines)


def _load_model_file(path) -> nn.Module:
    return load_baseline(path)[0] if is_baseline_file(path) else load_model(path)[0]


def load_test_items(model_path, classes, data=None):
    """The held-out test images named by a model file: its test patients' rows of its own data
    CSVs, or of `data` (labels CSVs: your copy of the same data, wherever it lives)."""
    meta = read_checkpoint(model_path)["metadata"]
    if "split" not in meta or "data" not in meta:
        raise ModelFileError(f"{model_path} does not record its training data and split: --split needs a model "
                             "trained by `covidct train`")
    csvs = list(data) if data else meta["data"]
    if not data:
        missing = [p for p in csvs if not Path(p).is_file()]
        if missing:
            raise InputNotFoundError(f"the data {model_path} was trained on is not here ({missing[0]}); "
                                     "pass your copy with --data CSV to apply its recorded test split")
    items = [it for csv_path in csvs for it in read_labels(csv_path, classes)]
    test = subset(items, meta["split"], "test")
    if not test:
        raise UnreadableInputError(f"none of the {len(meta['split']['test'])} test patients recorded in {model_path} has "
                                   f"an image in {', '.join(map(str, csvs))}: is it the data the model was trained on?")
    return test


def evaluate(models, data, out_dir, device: str = "auto", batch_size: int = EVAL_BATCH, progress: bool = False,
             regions_over_lungs: bool = True) -> dict:
    """Score `data` with one model or an ensemble; write metrics JSON, plots, predictions and a summary.

    regions_over_lungs: DRENet chooses its regions among the anchors over the lungs, as in use;
    False: among all anchors, as before that rule (how models published before it were measured).

    models: a DRENet or plain classifier, a model file of either, or a list (an ensemble: slice probabilities averaged).
    data: labels CSV(s), a list of LabelledImage, or a PreparedSet.
    """
    check_writable(out_dir, result_folder=False)  # a file there, or a place that cannot be written: before any work
    models = models if isinstance(models, (list, tuple)) else [models]
    loaded = [m if isinstance(m, nn.Module) else _load_model_file(m) for m in models]
    names = ["in-memory model" if isinstance(src, nn.Module) else str(src) for src in models]
    check_ensemble([m.config for m in loaded], names,
                   [id(src) if isinstance(src, nn.Module) else file_sha256(src) for src in models])
    config = loaded[0].config
    classes, positive = list(config.classes), config.positive_class
    if isinstance(data, (str, Path)):
        data = [data]
    if not isinstance(data, PreparedSet) and all(isinstance(d, (str, Path)) for d in data):
        data = [it for csv_path in data for it in read_labels(csv_path, classes)]
    prepared = data if isinstance(data, PreparedSet) else prepare_set(data, classes, config.input_size, progress, (config.window_level, config.window_width))
    if len(prepared) == 0:
        if prepared.skipped:
            raise NoLungsError(f"nothing to evaluate: none of the {len(prepared.skipped)} images has lungs "
                               f"(e.g. {prepared.skipped[0]})")
        raise UnreadableInputError("nothing to evaluate: no labelled images")
    patients = [p if p is not None else path for p, path in zip(prepared.patients, prepared.paths)]
    dev = resolve_device(device)
    masks = prepared.masks if regions_over_lungs else None
    outputs = [predict(m, prepared.images, dev, batch_size, masks) for m in loaded]
    probs = np.mean([o[0] for o in outputs], 0)
    backbone_probs = np.mean([o[1] for o in outputs], 0)
    labels = prepared.labels
    pos = classes.index(positive)
    result = {
        "models": names,
        "classes": classes,
        "positive_class": positive,
        "n_images": len(prepared),
        "n_patients": len(set(patients)),
        **score_set(labels, probs, patients, classes, positive),
        "calibration": reliability(labels == pos, probs[:, pos]),
        "backbone_head": score_set(labels, backbone_probs, patients, classes, positive),
        "ci95": bootstrap_intervals(labels, probs, patients, classes, positive),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_JSON).write_text(json.dumps(result, indent=1))
    with open(out_dir / PREDICTIONS_CSV, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "patient_id", "label"] + [f"p_{c}" for c in classes])
        for path, pid, lab, p in zip(prepared.paths, patients, labels, probs):
            writer.writerow([path, pid, classes[lab]] + [f"{v:.5f}" for v in p])
    _plots(out_dir, labels, probs, patients, classes, positive, result["calibration"])
    (out_dir / SUMMARY_MD).write_text(_summary(result))
    return result
