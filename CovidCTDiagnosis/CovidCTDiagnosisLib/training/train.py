"""Training DRENet (and the plain baselines) on labelled slices: patient split, cached preprocessing, the loop, best model.

One run folder holds everything: `recipe.json` (the settings), `split.json` (patients per split),
`state.pt` (weights, optimiser and schedule after the last finished epoch: `resume=True` carries
on from it), `best.pt` (the model file with the best validation AUC, patient level first, image
level to break ties), `history.json` (per-epoch losses, validation AUCs, times) and, with
`swa_from`, `swa.pt`: stochastic weight averaging (Izmailov et al., "Averaging Weights Leads to
Wider Optima and Better Generalization", UAI 2018), the mean of the weights after each epoch from
`swa_from` on, BatchNorm statistics recomputed for them on one pass of training batches; rewritten
after every epoch, so a run stopped early (`max_minutes`) still leaves the average of what it trained.

Recipe (the defaults, which trained the reference model): the authors' losses (losses.py) and
step decay after a short linear warm-up; AdamW with the backbone at 1/10 of the heads' rate
(SGD, momentum 0.9, as in the paper, is `optimizer="sgd"`); BatchNorm training on batches of
16. With BatchNorm frozen at its ImageNet statistics, any backbone rate that adapts the
backbone drove EfficientNet-Lite0's last ReLU6 layer to zero within an epoch (docs/training.md).
Rows without a patient id (training-only sets) are resampled each epoch to equal class counts,
so a set that is mostly one class (MosMed: 3/4 COVID) cannot teach "this scanner look = that class".
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_model, read_checkpoint, save_checkpoint, torch_save_atomic
from ..drenet import DRENet, DRENetConfig
from ..errors import InputNotFoundError, ModelFileError, OutputError, UnreadableInputError, UsageError
from ..inference import resolve_device
from ..outputs import check_writable
from ..performance import test_figures
from ..preprocessing import to_three_channels
from .augment import augment
from .baselines import BaselineConfig, ClassifierOutput, PlainClassifier, save_baseline
from .datasets import (SPLIT_FRACTIONS, PreparedSet, load_split, prepare_set, read_labels, save_split, split_by_patient,
                       subset)
from .evaluate import EVAL_BATCH, predict, score_set
from .losses import drenet_loss

RECIPE_JSON = "recipe.json"
SPLIT_JSON = "split.json"
STATE_PT = "state.pt"
BEST_PT = "best.pt"
SWA_PT = "swa.pt"
HISTORY_JSON = "history.json"
RUN_FILES = (RECIPE_JSON, SPLIT_JSON, STATE_PT, BEST_PT, SWA_PT, HISTORY_JSON)
BATCHNORM_MODES = ("frozen", "train")
RESUME_MAY_CHANGE = ("epochs", "max_minutes", "stop_after", "threads")  # a continued run may change these, and nothing else
TRAIN_BN_MOMENTUM = 0.1
SWA_SEED = 7  # the random stream of the BatchNorm pass of averaged weights: [seed, epoch, SWA_SEED]


@dataclass
class TrainConfig:
    """The recipe; saved in the run folder and in the model file."""

    backbone: str = "efficientnet_lite0"
    classes: tuple = ("COVID-19", "Non-COVID-19")
    positive_class: str = "COVID-19"
    input_size: int = 192
    top_k: int = 3
    proposals: int = 4  # regions scored by the part classifier for the ranking loss (>= top_k)
    model: str = "drenet"  # or "plain": the backbone alone as a classifier (baselines.py)
    epochs: int | None = 12  # None: 12 for a new run, a continued run's own
    batch_size: int = 16
    lr: float = 1e-3  # heads and navigator
    backbone_lr_factor: float = 0.1
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9, the paper's)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_decay_at: float = 0.75  # step decay (x lr_decay) after this fraction of the epochs
    lr_decay: float = 0.1
    warmup_epochs: float = 0.5  # linear learning-rate ramp from 0 over this many epochs
    batchnorm: str = "train"  # or "frozen": keep the pretrained BatchNorm statistics
    scanner_augmentation: bool = False  # also vary kernel sharpness and noise (augment.scanner_variation)
    seed: int = 0
    pretrained: bool = True  # ImageNet backbone (ignored with `init`)
    max_minutes: float | None = None  # stop before an epoch that would end past this budget
    stop_after: int | None = None  # end the run after this epoch, as a time budget would (the schedule stays `epochs`')
    swa_from: int = 0  # from this epoch (1-based) on, average the weights into swa.pt; 0: no averaging
    threads: int = 2  # CPU threads; 1 is faster when other jobs share the cores (no spinning at barriers)
    data: list = field(default_factory=list)  # labels CSVs (split by patient)
    extra_train: list = field(default_factory=list)  # training-only CSVs


def check_recipe(cfg: TrainConfig) -> None:
    """UsageError (one line, named as the command-line option) for a recipe that cannot train, before anything is done."""
    from ..backbones import FEATURE_STRIDE

    multiple = 2 * FEATURE_STRIDE  # DRENet's regions are half the input, seen at 1/32
    problems = []
    if cfg.input_size < multiple or cfg.input_size % multiple:
        problems.append(f"--input-size must be a multiple of {multiple} (64, 128, 192, ...), not {cfg.input_size}")
    if len(cfg.classes) != len(set(cfg.classes)) or not 2 <= len(cfg.classes) <= 3:
        problems.append(f"--classes needs 2 or 3 different class names, the disease first (e.g. COVID-19 Non-COVID-19), "
                        f"not {' '.join(cfg.classes) or 'none'}")
    elif cfg.positive_class not in cfg.classes:
        problems.append(f"the positive class {cfg.positive_class!r} is not one of --classes {' '.join(cfg.classes)}")
    if cfg.epochs is not None and cfg.epochs < 1:
        problems.append(f"--epochs must be at least 1, not {cfg.epochs}")
    if cfg.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, not {cfg.batch_size}")
    for option, value in (("--lr", cfg.lr), ("--backbone-lr-factor", cfg.backbone_lr_factor)):
        if not value > 0:
            problems.append(f"{option} must be positive, not {value:g}")
    if not cfg.warmup_epochs >= 0:
        problems.append(f"--warmup-epochs must be 0 or more, not {cfg.warmup_epochs:g}")
    if not 0 < cfg.lr_decay_at <= 1:
        problems.append(f"--lr-decay-at is a fraction of the epochs, above 0 and at most 1, not {cfg.lr_decay_at:g}")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        problems.append(f"--max-minutes must be positive, not {cfg.max_minutes:g}")
    if cfg.threads < 1:
        problems.append(f"--threads must be at least 1, not {cfg.threads}")
    if cfg.swa_from < 0 or (cfg.epochs is not None and cfg.swa_from > cfg.epochs):
        problems.append(_swa_from_problem(cfg.swa_from, cfg.epochs))
    if cfg.stop_after is not None and cfg.stop_after < 1:
        problems.append(f"--stop-after must be an epoch (1 or more), not {cfg.stop_after}")
    if cfg.swa_from and cfg.model != "drenet":
        problems.append("--swa-from averages DRENet runs only")
    if problems:
        raise UsageError("; ".join(problems))


def _swa_from_problem(swa_from: int, epochs: int) -> str:
    return f"--swa-from is an epoch of the run (1 to --epochs, {epochs}) or 0 for none, not {swa_from}"


@dataclass
class TrainResult:
    best_model: Path
    run_dir: Path
    history: list
    split: dict


def _set_train_mode(model: nn.Module, batchnorm: str) -> None:
    """Training mode. batchnorm="frozen": BatchNorm keeps its running statistics; "train": BatchNorm
    normalises each batch and its running statistics follow at TRAIN_BN_MOMENTUM (EfficientNet's
    own 0.01 would lag the new data by hundreds of steps, so validation would use stale statistics)."""
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"unknown batchnorm mode {batchnorm!r}; choose {' or '.join(BATCHNORM_MODES)}")
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if batchnorm == "frozen":
                m.eval()
            else:
                m.momentum = TRAIN_BN_MOMENTUM


def _training_batch(train_set: PreparedSet, idx, rng: np.random.Generator, cfg: "TrainConfig", dev: torch.device):
    """Augmented model input (B, 3, S, S) and lung masks (B, S, S) of the training images `idx`."""
    x, masks = zip(*(augment(train_set.images[i], train_set.masks[i], rng, cfg.scanner_augmentation, with_mask=True) for i in idx))
    x = torch.from_numpy(to_three_channels(np.stack(x))).to(dev).contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(np.stack(masks)).to(dev)  # regions chosen over the lungs, as in use


def add_to_average(total: dict | None, model: nn.Module) -> dict:
    """Running sum (float64) of the model's floating-point weights and buffers; integer buffers are the latest."""
    state = model.state_dict()
    if total is None:
        return {k: v.detach().to("cpu", torch.float64 if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}
    for k, v in state.items():
        if v.is_floating_point():
            total[k] += v.detach().to("cpu", torch.float64)
        else:
            total[k] = v.detach().to("cpu", copy=True)
    return total


def averaged_model(model: nn.Module, total: dict, count: int, train_set: PreparedSet, cfg: "TrainConfig",
                   dev: torch.device, seed) -> nn.Module:
    """A copy of `model` with the mean of `count` summed weights (`add_to_average`); with BatchNorm trained
    (cfg.batchnorm "train"), its running statistics are recomputed as the exact mean over one epoch of
    augmented training batches, since averaged weights no longer match any epoch's statistics (Izmailov et al.)."""
    averaged = copy.deepcopy(model)
    averaged.load_state_dict({k: (v / count).float() if v.is_floating_point() else v for k, v in total.items()})
    norms = [m for m in averaged.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if cfg.batchnorm == "train" and norms:
        averaged.train()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass
        rng = np.random.default_rng(seed)
        order = _epoch_indices(train_set, rng)
        with torch.no_grad():
            for i in range(0, len(order), cfg.batch_size):
                x, _ = _training_batch(train_set, order[i : i + cfg.batch_size], rng, cfg, dev)
                averaged.features(x)  # only whole images set the statistics, as in training (drenet.batchnorm_statistics_frozen)
        for m in norms:
            m.momentum = TRAIN_BN_MOMENTUM
    return averaged.eval()


def _epoch_indices(train: PreparedSet, rng: np.random.Generator) -> np.ndarray:
    """All split training images plus a class-balanced draw of the training-only ones, shuffled."""
    extra = np.array([p is None for p in train.patients])
    chosen = [np.flatnonzero(~extra)]
    extra_idx = np.flatnonzero(extra)
    if extra_idx.size:
        groups = [extra_idx[train.labels[extra_idx] == c] for c in np.unique(train.labels[extra_idx])]
        per_class = min(g.size for g in groups)
        chosen += [rng.choice(g, per_class, replace=False) for g in groups]
    return rng.permutation(np.concatenate(chosen))


def _build_model(cfg: TrainConfig, init) -> nn.Module:
    if cfg.model == "plain":
        if init is not None:
            raise ValueError("--init fine-tunes a DRENet model file; it cannot start a plain classifier")
        config = BaselineConfig(cfg.backbone, tuple(cfg.classes), cfg.positive_class, cfg.input_size)
        return PlainClassifier(config, pretrained_backbone=cfg.pretrained)
    if cfg.model != "drenet":
        raise ValueError(f"unknown model {cfg.model!r}; choose drenet or plain")
    if init is None:
        config = DRENetConfig(cfg.backbone, tuple(cfg.classes), cfg.positive_class, cfg.input_size, cfg.top_k)
        return DRENet(config, pretrained_backbone=cfg.pretrained)
    model, _ = load_model(init, expected_classes=cfg.classes)
    return model


def _loss(out, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, ClassifierOutput):
        loss = F.cross_entropy(out.logits, y)
        return loss, {"ce": float(loss.detach())}
    return drenet_loss(out, y)


def _decay_epoch(cfg: TrainConfig) -> int:
    """The last epoch at the full learning rate: the step decay starts after it."""
    return max(1, round(cfg.lr_decay_at * cfg.epochs))


def _lr_factor(cfg: TrainConfig, steps_per_epoch: int):
    """Per optimiser step: linear warm-up, then the step decay."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    decay_step = _decay_epoch(cfg) * steps_per_epoch

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return ramp * (cfg.lr_decay if step >= decay_step else 1.0)

    return factor


def selection_key(record: dict) -> tuple[float, float]:
    """How a run's best epoch is chosen: validation AUC at patient level, then at image level."""
    return (record["val_patient_auc"] or 0.0, record["val_image_auc"] or 0.0)


def best_record(history: list[dict]) -> dict:
    """The history record of the best epoch (the earliest of equals: a later tie does not replace it)."""
    return max(history, key=selection_key)


def read_split(path) -> dict:
    """The patient split saved in a run folder's split.json or recorded in a model file."""
    if Path(path).suffix == ".json":
        return load_split(path)
    meta = read_checkpoint(path)["metadata"]
    if "split" not in meta:
        raise ModelFileError(f"{path} records no patient split")
    return meta["split"]


def holds_run(out_dir) -> bool:
    """Whether a folder already holds (part of) a training run."""
    return any((Path(out_dir) / name).exists() for name in RUN_FILES)


def check_training_items(items, split: dict, classes) -> None:
    """Refuse (one line, before any image is read or anything written) what cannot train or select a model:
    a listed image that is not there (of any split: the test patients' too, for a later `evaluate --split`),
    no validation patients (no patient ids, or too few patients for the split), and a training or validation
    part without images of every class (a classifier learns, and AUC measures, the difference between them)."""
    missing = [it.path for it in items if not Path(it.path).is_file()]
    if missing:
        raise InputNotFoundError(f"{len(missing)} of the {len(items)} labelled images are not there, e.g. {missing[0]}")
    patients = {it.patient_id for it in items if it.patient_id is not None}
    if not split["val"]:
        raise UnreadableInputError(
            "no validation patients: at least one labels CSV needs a patient_id column" if not patients else
            f"no validation patients: {len(patients)} patients are too few for the split by patient "
            f"({'/'.join(str(round(100 * f)) for f in SPLIT_FRACTIONS)} %: a class needs at least "
            f"{next(n for n in range(1, 1000) if round(n * SPLIT_FRACTIONS[1]))} patients to give one for validation)")
    for part in ("train", "val"):
        counts = Counter(it.label for it in subset(items, split, part))
        absent = [c for c in classes if not counts[c]]
        if absent:
            held = ", ".join(f"{c} {n}" for c, n in counts.items()) or "none"
            raise UnreadableInputError(f"the {'training' if part == 'train' else 'validation'} images hold no "
                                       f"{' or '.join(absent)} (images per class: {held}): every class "
                                       f"({', '.join(classes)}) is needed; label more patients of it")


def requested_recipe(config: TrainConfig | None, data, extra_train, init) -> tuple[TrainConfig, str | None]:
    """The recipe asked for, with data paths resolved and, with `init`, that model's architecture and classes."""
    cfg = replace(config or TrainConfig())
    cfg.data = [str(Path(p).resolve()) for p in data]
    cfg.extra_train = [str(Path(p).resolve()) for p in extra_train]
    init = str(Path(init).resolve()) if init else None
    if init:  # the fine-tuned model keeps the architecture and classes of the model it starts from
        base = load_model(init)[0].config
        if cfg.input_size != base.input_size:
            print(f"note: the --init model keeps its input size {base.input_size} (not --input-size {cfg.input_size})",
                  file=sys.stderr)
        cfg.backbone, cfg.classes, cfg.positive_class = base.backbone, tuple(base.classes), base.positive_class
        cfg.input_size, cfg.top_k = base.input_size, base.top_k
    return cfg, init


def continuation(out_dir, requested: TrainConfig | None = None, init=None) -> tuple[TrainConfig, str | None, dict, int]:
    """The recipe, start model, saved state and originally planned epochs with which the run in `out_dir` continues.

    requested: the recipe asked for now (None: the run's own). It must equal the saved recipe but for
    RESUME_MAY_CHANGE; `epochs` may grow (the run trains on to it) but not shrink. UsageError otherwise.
    """
    out = Path(out_dir)
    if not (out / STATE_PT).is_file():
        raise InputNotFoundError(f"nothing to resume: {out / STATE_PT} is missing")
    saved = json.loads((out / RECIPE_JSON).read_text())
    cfg = TrainConfig(**{**saved["recipe"], "classes": tuple(saved["recipe"]["classes"])})
    state = torch.load(out / STATE_PT, map_location="cpu", weights_only=True)
    if requested is not None:
        asked = {k: getattr(requested, k) for k in (f.name for f in fields(TrainConfig)) if k not in RESUME_MAY_CHANGE}
        asked["init"] = init
        differ = [f"--{k.replace('_', '-')} {v!r} (this run: {saved['init'] if k == 'init' else getattr(cfg, k)!r})"
                  for k, v in asked.items() if v != (saved["init"] if k == "init" else getattr(cfg, k))]
        if differ:
            raise UsageError(f"{out} was trained with another recipe ({out / RECIPE_JSON}); asked for {'; '.join(differ)}: "
                             "repeat the run's options to continue it, or train into a new folder")
        cfg.max_minutes, cfg.stop_after, cfg.threads = requested.max_minutes, requested.stop_after, requested.threads
        cfg.epochs = requested.epochs if requested.epochs is not None else cfg.epochs
    if cfg.epochs < state["epoch"]:
        raise UsageError(f"{out} has already trained {state['epoch']} epochs, more than --epochs {cfg.epochs}: "
                         "train into a new folder for a shorter run")
    return cfg, saved["init"], state, saved["recipe"]["epochs"]


def _say_what_resume_does(out: Path, cfg: TrainConfig, planned_epochs: int, done: int) -> None:
    """One line on stderr: the run is complete, resumes, or is extended (and whether that equals a fresh run)."""
    planned = replace(cfg, epochs=planned_epochs)
    if done == cfg.epochs:
        message = (f"{out}: the run is complete at {done} epochs; nothing to train "
                   f"(pass a larger --epochs to continue it)")
    elif cfg.epochs == planned.epochs:
        message = f"{out}: resuming at epoch {done + 1} of {cfg.epochs}"
    else:
        same = min(done, _decay_epoch(planned)) == min(done, _decay_epoch(cfg))
        message = (f"{out}: continuing from epoch {done + 1} to {cfg.epochs} (the run was planned for {planned.epochs}); "
                   + ("as a fresh run of that length would" if same else
                      f"its learning rate already decayed after epoch {_decay_epoch(planned)}, so this differs from a "
                      f"fresh {cfg.epochs}-epoch run (decay after epoch {_decay_epoch(cfg)})"))
    print(message, file=sys.stderr)


def train(data, out_dir, config: TrainConfig | None = None, *, extra_train=(), resume: bool = False, init=None,
          split: dict | None = None, device: str = "auto", progress: bool = True) -> TrainResult:
    """Train DRENet (or, with config.model="plain", a plain classifier) on labels CSVs `data`
    (+ training-only `extra_train`); returns the best model file.

    `init`: a model file to fine-tune (its architecture and classes are kept). `resume`: carry on
    the run in `out_dir` with its saved recipe and split (see `continuation`: `config`, if given,
    must match it; a larger `config.epochs` trains on to it; a complete run returns at once).
    Without `resume` a folder that holds a run is refused (OutputError), never replaced. `split`:
    patient ids per split to use instead of a new seeded split (to compare models on the same patients).
    """
    from tqdm import tqdm

    out = Path(out_dir)
    state = None
    if config is not None:
        check_recipe(config)
    if resume:
        requested, init = requested_recipe(config, data, extra_train, init) if config is not None else (None, None)
        cfg, init, state, planned_epochs = continuation(out, requested, init)
        _say_what_resume_does(out, cfg, planned_epochs, state["epoch"])
        if state["epoch"] == cfg.epochs:
            return TrainResult(out / BEST_PT, out, state["history"], load_split(out / SPLIT_JSON))
    else:
        check_writable(out, result_folder=False)  # a file there, or a place that cannot be written: before any work
        if holds_run(out):
            raise OutputError(f"{out} already holds a training run: pass --resume to continue it, or choose a new --out")
        cfg, init = requested_recipe(config, data, extra_train, init)
        if cfg.epochs is None:
            cfg.epochs = TrainConfig.epochs
    if cfg.swa_from > cfg.epochs:  # the epochs are known only now: the default, or a continued run's own
        raise UsageError(_swa_from_problem(cfg.swa_from, cfg.epochs))
    if cfg.swa_from and cfg.swa_from <= _decay_epoch(cfg) < cfg.epochs:
        print(f"note: --swa-from {cfg.swa_from} averages across the learning-rate decay after epoch {_decay_epoch(cfg)} "
              "(averaging is meant for epochs at a high, constant rate)", file=sys.stderr)

    torch.set_num_threads(cfg.threads)
    items = [it for p in cfg.data for it in read_labels(p, cfg.classes)]
    items += [it for p in cfg.extra_train for it in read_labels(p, cfg.classes, training_only=True)]
    if (out / SPLIT_JSON).is_file() and resume:
        split = load_split(out / SPLIT_JSON)
    else:
        split = split or split_by_patient(items, cfg.seed)
    check_training_items(items, split, cfg.classes)
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, init).to(dev, memory_format=torch.channels_last)
    window = (model.config.window_level, model.config.window_width)
    train_set = prepare_set(subset(items, split, "train"), cfg.classes, cfg.input_size, progress, window)
    val_set = prepare_set(subset(items, split, "val"), cfg.classes, cfg.input_size, progress, window)
    backbone_params = list(model.backbone.parameters())
    head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": backbone_params, "lr": cfg.lr * cfg.backbone_lr_factor}, {"params": head_params, "lr": cfg.lr}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")
    steps_per_epoch = -(-len(_epoch_indices(train_set, np.random.default_rng(0))) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, steps_per_epoch))
    out.mkdir(parents=True, exist_ok=True)  # only now: bad data or options leave no run folder behind
    (out / RECIPE_JSON).write_text(json.dumps({"recipe": asdict(cfg), "init": init}, indent=1))  # resumed: its epochs
    if not resume:
        save_split(split, out / SPLIT_JSON)
    history, start = [], 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"]
    swa_total, swa_count = (state.get("swa_total"), state.get("swa_count", 0)) if state is not None else (None, 0)

    pos = list(cfg.classes).index(cfg.positive_class)

    def validation(net: nn.Module) -> dict:
        probs, _ = predict(net, val_set.images, dev, EVAL_BATCH, val_set.masks)
        return score_set(val_set.labels, probs, val_set.patients, list(cfg.classes), cfg.positive_class)

    def metadata(epochs_trained: int, image_auc: float, patient_auc: float, **recipe) -> dict:
        return {
            "name": out.name,
            "data": cfg.data,
            "extra_train": cfg.extra_train,
            "split": split,
            "recipe": {**asdict(cfg), "init": init, "epochs_trained": epochs_trained, **recipe},
            "validation": {"image_auc": image_auc, "patient_auc": patient_auc, "positive_class_index": pos},
        }

    began = time.monotonic()
    for epoch in range(start, cfg.epochs):
        if cfg.stop_after is not None and epoch >= cfg.stop_after:
            print(f"{out}: stopped after epoch {epoch} of {cfg.epochs} (--stop-after); --resume trains on", file=sys.stderr)
            break
        if cfg.max_minutes and history and epoch > start:
            per_epoch = (time.monotonic() - began) / (epoch - start)
            if (time.monotonic() - began + per_epoch) / 60 > cfg.max_minutes:
                print(f"{out}: stopped after epoch {epoch} of {cfg.epochs}: another would end past --max-minutes "
                      f"{cfg.max_minutes:g}; --resume trains on", file=sys.stderr)
                break
        t0 = time.monotonic()
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 1000 + epoch)
        _set_train_mode(model, cfg.batchnorm)
        order = _epoch_indices(train_set, rng)
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        sums, bar = {}, tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, mininterval=5)
        for step, idx in enumerate(bar, 1):
            x, masks = _training_batch(train_set, idx, rng, cfg, dev)
            y = torch.from_numpy(train_set.labels[idx]).to(dev)
            loss, terms = _loss(model(x, proposals=cfg.proposals, lung_mask=masks), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in {"loss": float(loss.detach()), **terms}.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{sums['loss'] / step:.3f}", val_auc=history[-1]["val_patient_auc"] if history else None)

        scores = validation(model)
        image_auc = scores["image_level"]["positive"]["auc"]
        patient_auc = scores["patient_level"]["mean"]["positive"]["auc"]
        record = {
            "epoch": epoch + 1,
            **{f"train_{k}": v / len(batches) for k, v in sums.items()},
            "val_image_auc": image_auc,
            "val_patient_auc": patient_auc,
            "val_image_accuracy": scores["image_level"]["accuracy"],
            "seconds": round(time.monotonic() - t0, 1),
            "images": int(len(order)),
        }
        if cfg.swa_from and epoch + 1 >= cfg.swa_from:
            swa_total, swa_count = add_to_average(swa_total, model), swa_count + 1
            averaged = averaged_model(model, swa_total, swa_count, train_set, cfg, dev, [cfg.seed, epoch + 1, SWA_SEED])
            swa_scores = validation(averaged)
            record["swa_val_image_auc"] = swa_scores["image_level"]["positive"]["auc"]
            record["swa_val_patient_auc"] = swa_scores["patient_level"]["mean"]["positive"]["auc"]
            save_checkpoint(out / SWA_PT, averaged, trained=True, metadata=metadata(
                epoch + 1, record["swa_val_image_auc"], record["swa_val_patient_auc"], swa_epochs=[cfg.swa_from, epoch + 1]))
        history.append(record)
        if best_record(history) is record:
            best = metadata(epoch + 1, image_auc, patient_auc, best_epoch=epoch + 1)
            if isinstance(model, DRENet):
                save_checkpoint(out / BEST_PT, model, trained=True, metadata=best)
            else:
                save_baseline(out / BEST_PT, model, best)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "history": history, "epoch": epoch + 1, "swa_total": swa_total, "swa_count": swa_count}
        torch_save_atomic(state, out / STATE_PT)
        (out / HISTORY_JSON).write_text(json.dumps(history, indent=1))
        swa = f", averaged from epoch {cfg.swa_from}: patient {record['swa_val_patient_auc']}" if "swa_val_patient_auc" in record else ""
        tqdm.write(f"epoch {epoch + 1}: loss {record['train_loss']:.3f}, val AUC image {image_auc}, patient {patient_auc}{swa}, {record['seconds']} s")
    return TrainResult(out / BEST_PT, out, history, split)


def publish_model(best_model, dest, name: str, evaluation: dict | None = None, max_float32_mb: float = 64.0) -> Path:
    """Copy a run's best model to `dest` under `name`, with its validated figures (`evaluation`: `evaluate`'s
    result on the held-out test patients; None: the file says it has none); float16 only if float32 would exceed
    `max_float32_mb`: rounding the reference model's weights to float16 moved its probabilities by up to about 0.1."""
    model, _ = load_model(best_model)
    metadata = read_checkpoint(best_model)["metadata"]
    metadata.update(name=name, test=test_figures(evaluation) if evaluation else {})
    float32_mb = sum(v.numel() * 4 for v in model.state_dict().values() if v.is_floating_point()) / 2**20
    return save_checkpoint(dest, model, trained=True, metadata=metadata, half=float32_mb > max_float32_mb)
