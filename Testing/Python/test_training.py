"""Training package: patient split, augmentation, losses, metrics, and a tiny train/resume/evaluate run."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch

from CovidCTDiagnosisLib.checkpoint import load_model, read_checkpoint
from CovidCTDiagnosisLib.training import commands
from CovidCTDiagnosisLib.training.augment import augment, fill_blank, scanner_variation
from CovidCTDiagnosisLib.phantom import make_chest_phantom
from CovidCTDiagnosisLib.slice_selection import DEFAULT_COUNT
from CovidCTDiagnosisLib.training.datasets import LabelledImage, load_split, prepare_set, read_labels, split_by_patient, subset
from CovidCTDiagnosisLib.training.evaluate import binary_metrics, bootstrap_intervals, compute_metrics, evaluate, load_test_items, reliability
from CovidCTDiagnosisLib.training.losses import drenet_loss, ranking_loss
from CovidCTDiagnosisLib.training.train import (BATCHNORM_MODES, BEST_PT, HISTORY_JSON, SPLIT_JSON, STATE_PT, SWA_PT, TrainConfig,
                                                _lr_factor, read_split, train)
from CovidCTDiagnosisLib.training.baselines import PlainClassifier, load_baseline
from CovidCTDiagnosisLib.training.compare import COMPARISON_JSON, COMPARISON_MD
from CovidCTDiagnosisLib.backbones import build_backbone
from CovidCTDiagnosisLib.errors import InputNotFoundError, ModelFileError, OutputError, UsageError

CLASSES = ("COVID-19", "Non-COVID-19")


def _phantom(rng, covid: bool, size: int = 128) -> np.ndarray:
    """An 8-bit lung-window slice: body, two dark lungs, and bright patches in the lungs if `covid`."""
    img = np.zeros((size, size), np.uint8)
    c = size // 2
    cv2.ellipse(img, (c, c), (int(size * 0.45), int(size * 0.35)), 0, 0, 360, 235, -1)
    for dx in (-1, 1):
        cv2.ellipse(img, (c + dx * size // 5, c), (size // 7, size // 4), 0, 0, 360, 25, -1)
        if covid:
            cv2.circle(img, (c + dx * size // 5 + int(rng.integers(-6, 6)), c + int(rng.integers(-15, 15))), size // 16, 120, -1)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory):
    """16 images from 16 patients, 8 per class, as a labels CSV with the dataset's folder labels."""
    root = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(0)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient_id"])
        for i in range(16):
            label = "COVID" if i % 2 == 0 else "NonCOVID"
            cv2.imwrite(str(root / f"img{i}.png"), _phantom(rng, label == "COVID"))
            writer.writerow([f"img{i}.png", label, f"P{i}"])
    return root / "labels.csv"


def test_split_is_by_patient_stratified_and_seeded():
    items = [LabelledImage(f"{p}-{s}.png", "COVID-19" if p % 2 else "Non-COVID-19", f"P{p}") for p in range(40) for s in range(3)]
    items += [LabelledImage(f"extra{i}.png", "COVID-19", None) for i in range(5)]
    split = split_by_patient(items, seed=1)
    assert split == split_by_patient(items, seed=1) and split != split_by_patient(items, seed=2)
    sets = [set(split[n]) for n in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert [len(s) for s in sets] == [24, 4, 12]
    assert all(it.patient_id is not None for it in subset(items, split, "test"))
    assert sum(it.patient_id is None for it in subset(items, split, "train")) == 5


def test_binary_metrics_on_hand_made_counts():
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    predicted = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], bool)  # tp 3, fn 1, fp 1, tn 5
    m = binary_metrics(truth, predicted.astype(float), predicted)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 5)
    assert m["recall"] == pytest.approx(0.75) and m["precision"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6) and m["accuracy"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(0.75) and m["f1_paper_eq5"] == pytest.approx(0.75)
    m = binary_metrics(truth, truth.astype(float), np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], bool))  # P 1, R 0.25
    assert m["f1"] == pytest.approx(0.4) and m["f1_paper_eq5"] == pytest.approx(0.625)
    assert m["auc"] == pytest.approx(1.0)


def test_three_class_metrics_are_per_class_and_macro():
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    m = compute_metrics(np.array([0, 1, 2, 1]), probs, ["A", "B", "C"], "A")
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["B"]["recall"] == pytest.approx(0.5) and m["positive"]["precision"] == pytest.approx(0.5)
    assert m["macro"]["recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_reliability_of_a_calibrated_score_is_near_zero():
    score = np.repeat([0.25, 0.75], 4)
    truth = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert reliability(truth, score)["ece"] == pytest.approx(0.0)


def test_bootstrap_intervals_resample_patients():
    """Separable patients: every interval is [1, 1]. Uninformative scores: the AUC interval holds 0.5 and is wide.
    Ten slices per patient count as one patient's evidence, not ten (the interval is as wide as with one slice)."""
    classes = ["COVID-19", "Non-COVID-19"]
    rng = np.random.default_rng(1)
    labels = np.repeat([0] * 20 + [1] * 20, 10)
    patients = np.repeat([f"p{i}" for i in range(40)], 10).tolist()
    separable = np.where(labels == 0, 0.9, 0.1)
    ci = bootstrap_intervals(labels, np.stack([separable, 1 - separable], 1), patients, classes, "COVID-19", resamples=300)
    assert all(v == [1.0, 1.0] for v in ci.values()) and set(ci) == {"image_auc", "patient_auc", "patient_sensitivity", "patient_specificity"}
    noise = np.repeat(rng.random(40), 10)
    ci = bootstrap_intervals(labels, np.stack([noise, 1 - noise], 1), patients, classes, "COVID-19", resamples=300)
    one = bootstrap_intervals(labels[::10], np.stack([noise, 1 - noise], 1)[::10], patients[::10], classes, "COVID-19", resamples=300)
    low, high = ci["patient_auc"]
    assert low < 0.5 < high and high - low > 0.25
    assert ci["image_auc"] == pytest.approx(one["image_auc"])


def test_fill_blank_keeps_the_lungs_and_fills_around_them():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:54, 8:28] = True
    image[mask] = rng.integers(1, 255, mask.sum())
    filled = fill_blank(image, mask, rng)
    assert np.array_equal(filled[mask], image[mask])
    assert (filled[~mask] > 0).mean() > 0.3  # the blank now holds rotated lung tissue
    out = augment(image, mask, rng)
    assert out.shape == (64, 64) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    same, moved = augment(image, mask, np.random.default_rng(1), with_mask=True)  # the mask follows flip and rotation
    assert np.array_equal(same, augment(image, mask, np.random.default_rng(1)))
    assert moved.dtype == bool and abs(int(moved.sum()) - int(mask.sum())) < 0.1 * mask.sum()
    assert (same[moved] > 0).mean() > 0.9  # the transformed lungs hold the transformed lung tissue


def test_scanner_variation_changes_kernel_and_noise_inside_the_lungs_only():
    """A phantom slice as another kernel and dose give it: lungs blurred, sharpened or noisier, the zeroed
    background still zero, values in [0, 1]; over many draws both sharper and smoother versions occur."""
    import SimpleITK as sitk

    from CovidCTDiagnosisLib.preprocessing import lung_window

    phantom = make_chest_phantom(seed=3)
    hu, lungs = sitk.GetArrayFromImage(phantom.image), sitk.GetArrayFromImage(phantom.lung_labels) > 0
    k = hu.shape[0] // 2
    x = np.where(lungs[k], lung_window(hu[k], -700, 1500), 0).astype(np.float32)
    inner = lungs[k] & np.roll(lungs[k], 1, 1)
    roughness = lambda a: float(np.abs(np.diff(a, axis=1))[inner[:, 1:]].mean())  # noqa: E731
    seen = []
    rng = np.random.default_rng(0)
    for _ in range(40):
        y = scanner_variation(x, rng)
        assert y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
        assert not y[x == 0].any()
        seen.append(roughness(y) / roughness(x))
    assert min(seen) < 0.8 and max(seen) > 1.2  # smoother and rougher lung texture both occur
    assert sum(abs(r - 1) < 1e-6 for r in seen) > 0  # and sometimes none: probability SCANNER_PROBABILITY each


def test_ranking_loss_follows_part_confidence():
    targets = torch.tensor([0])
    part_logits = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])  # region 0 most confident in class 0
    assert ranking_loss(torch.tensor([[5.0, 3.0, 1.0]]), part_logits, targets) == 0
    assert ranking_loss(torch.tensor([[1.0, 3.0, 5.0]]), part_logits, targets) == pytest.approx(3 + 5 + 3)


def test_drenet_loss_is_the_sum_of_the_four_terms():
    from types import SimpleNamespace

    torch.manual_seed(0)
    scores = torch.randn(2, 4, requires_grad=True)
    out = SimpleNamespace(logits=torch.randn(2, 2), global_logits=torch.randn(2, 2), part_logits=torch.randn(2, 4, 2),
                          region_scores=scores)
    total, terms = drenet_loss(out, torch.tensor([0, 1]))
    assert set(terms) == {"global", "concat", "part", "rank"}
    assert total.item() == pytest.approx(sum(terms.values()), rel=1e-5)
    total.backward()
    assert scores.grad.abs().sum() > 0  # the ranking term trains the navigator


def test_train_resume_and_evaluate_tiny(synthetic_csv, tmp_path, capsys):
    run = tmp_path / "run"
    config = TrainConfig(input_size=64, epochs=2, batch_size=4, pretrained=False, max_minutes=1e-9)
    first = train([synthetic_csv], run, config, progress=False)
    assert len(first.history) == 1  # the time budget stopped it after one epoch, and said so
    assert "stopped after epoch 1 of 2: another would end past --max-minutes" in capsys.readouterr().err
    split = load_split(run / SPLIT_JSON)
    assert split == first.split and len(split["val"]) == 2 and len(split["test"]) == 4
    result = train([], run, resume=True, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert len(json.loads((run / HISTORY_JSON).read_text())) == 2
    model, info = load_model(run / BEST_PT)
    assert info.trained and info.input_size == 64 and info.classes == list(CLASSES)
    assert read_checkpoint(run / BEST_PT)["metadata"]["split"] == split

    test_items = load_test_items(run / BEST_PT, CLASSES)
    assert {it.patient_id.split("/")[-1] for it in test_items} == {p.split("/")[-1] for p in split["test"]}
    metrics = evaluate(run / BEST_PT, test_items, tmp_path / "eval")
    assert metrics["n_images"] == 4 and metrics["image_level"]["n"] == 4
    for name in ("metrics.json", "roc.png", "confusion.png", "reliability.png", "summary.md", "predictions.csv"):
        assert (tmp_path / "eval" / name).is_file()


def test_a_run_folder_is_never_replaced_and_resume_says_what_it_does(synthetic_csv, tmp_path, capsys):
    from CovidCTDiagnosisLib.cli import main

    run = tmp_path / "run"
    options = ["--data", str(synthetic_csv), "--out", str(run), "--input-size", "64", "--batch-size", "8",
               "--no-pretrained", "--quiet"]
    assert main(["train", *options, "--epochs", "1"]) == 0
    history = (run / HISTORY_JSON).read_bytes()
    capsys.readouterr()

    def refused(argv, code, *words):
        assert main(argv) == code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
        assert (run / HISTORY_JSON).read_bytes() == history  # the run is untouched

    refused(["train", *options, "--epochs", "3"], OutputError.exit_code, "already holds a training run", "--resume")
    refused(["train", *options, "--resume", "--lr", "0.5"], UsageError.exit_code, "another recipe", "lr 0.5")
    assert main(["train", *options, "--resume"]) == 0  # its own epoch count: complete, nothing trained
    assert "complete at 1 epochs" in capsys.readouterr().err and (run / HISTORY_JSON).read_bytes() == history
    assert main(["train", *options, "--resume", "--epochs", "2"]) == 0
    assert "continuing from epoch 2 to 2 (the run was planned for 1)" in capsys.readouterr().err
    assert [r["epoch"] for r in json.loads((run / HISTORY_JSON).read_text())] == [1, 2]
    history = (run / HISTORY_JSON).read_bytes()
    assert main(["train", *options, "--resume"]) == 0  # the recipe now plans 2 epochs
    assert "complete at 2 epochs" in capsys.readouterr().err
    refused(["train", *options, "--resume", "--epochs", "1"], UsageError.exit_code, "already trained 2 epochs")
    with pytest.raises(ModelFileError, match="same model"):
        evaluate([run / BEST_PT, run / BEST_PT], synthetic_csv, tmp_path / "ev")


def test_weight_averaging_is_the_mean_of_its_epochs_across_a_resume(synthetic_csv, tmp_path):
    """swa.pt: the mean of the weights after epochs 2 and 3 (the run stopped by its time budget after each epoch and
    resumed), BatchNorm statistics recomputed for those weights rather than averaged."""
    run = tmp_path / "run"
    config = TrainConfig(input_size=64, epochs=3, batch_size=4, pretrained=False, max_minutes=1e-9, swa_from=2)
    weights = []
    for epoch in range(3):
        train([synthetic_csv], run, config, resume=epoch > 0, progress=False)
        weights.append(torch.load(run / STATE_PT, weights_only=True)["model"])
        assert (run / SWA_PT).is_file() == (epoch >= 1)
    history = json.loads((run / HISTORY_JSON).read_text())
    assert ["swa_val_patient_auc" in r for r in history] == [False, True, True]
    meta = read_checkpoint(run / SWA_PT)["metadata"]
    assert meta["recipe"]["swa_epochs"] == [2, 3] and meta["validation"]["patient_auc"] == history[-1]["swa_val_patient_auc"]
    averaged = load_model(run / SWA_PT)[0].state_dict()
    statistics = [n for n in averaged if n.endswith(("running_mean", "running_var"))]
    for name, value in averaged.items():
        if value.is_floating_point() and name not in statistics:
            torch.testing.assert_close(value, (weights[1][name] + weights[2][name]) / 2)
    assert statistics and not any(torch.allclose(averaged[n], (weights[1][n] + weights[2][n]) / 2) for n in statistics)


@pytest.mark.parametrize("epochs", [["--epochs", "2"], []])  # [] : the default 12 epochs
def test_swa_from_beyond_the_run_is_refused_in_one_line(synthetic_csv, tmp_path, capsys, epochs):
    from CovidCTDiagnosisLib.cli import main

    beyond = "3" if epochs else str(TrainConfig.epochs + 1)
    argv = ["train", "--data", str(synthetic_csv), "--out", str(tmp_path / "run"), *epochs, "--swa-from", beyond]
    assert main(argv) == UsageError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--swa-from" in err and not (tmp_path / "run").exists()


def test_resume_without_epochs_checks_swa_from_against_the_runs_own(synthetic_csv, tmp_path, capsys):
    """--swa-from 13 of a 14-epoch run: accepted, and again on --resume without --epochs (the run's 14, not the
    default 12, bounds it)."""
    from CovidCTDiagnosisLib.cli import main

    options = ["--data", str(synthetic_csv), "--out", str(tmp_path / "run"), "--input-size", "64", "--batch-size", "8",
               "--no-pretrained", "--quiet", "--swa-from", "13", "--stop-after", "1"]
    assert main(["train", *options, "--epochs", "14"]) == 0
    assert main(["train", *options, "--resume"]) == 0
    assert capsys.readouterr().err.count("stopped after epoch 1 of 14 (--stop-after)") == 2


def test_stop_after_ends_the_run_on_its_schedule_and_says_so(synthetic_csv, tmp_path, capsys):
    """--stop-after 1 of 3 epochs: one epoch trained, a line on stderr, the recipe still plans 3 (its schedule);
    --resume without it trains on to 3."""
    from CovidCTDiagnosisLib.cli import main

    options = ["--data", str(synthetic_csv), "--out", str(tmp_path / "run"), "--input-size", "64", "--batch-size", "8",
               "--no-pretrained", "--quiet", "--epochs", "3"]
    assert main(["train", *options, "--stop-after", "1"]) == 0
    assert "stopped after epoch 1 of 3 (--stop-after)" in capsys.readouterr().err
    assert [r["epoch"] for r in json.loads((tmp_path / "run" / HISTORY_JSON).read_text())] == [1]
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["recipe"]["epochs"] == 3
    assert main(["train", *options, "--resume"]) == 0
    assert "resuming at epoch 2 of 3" in capsys.readouterr().err
    assert [r["epoch"] for r in json.loads((tmp_path / "run" / HISTORY_JSON).read_text())] == [1, 2, 3]


def test_commands_parse_and_fine_tune_one_command(synthetic_csv, tmp_path, capsys):
    import argparse

    run = tmp_path / "base"
    train([synthetic_csv], run, TrainConfig(input_size=64, epochs=1, batch_size=8, pretrained=False), progress=False)
    parser = argparse.ArgumentParser()
    commands.add_train_arguments(parser)
    args = parser.parse_args(["--init", str(run / BEST_PT), "--data", str(synthetic_csv), "--out", str(tmp_path / "ft"),
                              "--epochs", "1", "--quiet"])
    assert commands.run_train(args) == 0
    assert read_checkpoint(tmp_path / "ft" / BEST_PT)["config"]["input_size"] == 64  # kept from the --init model
    assert "keeps its input size 64 (not --input-size 192)" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    commands.add_evaluate_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "ft" / BEST_PT), "--split", str(tmp_path / "ft" / BEST_PT),
                              "--out", str(tmp_path / "ev"), "--quiet"])
    assert commands.run_evaluate(args) == 0


def test_read_labels_maps_dataset_labels(synthetic_csv):
    items = read_labels(synthetic_csv, CLASSES)
    assert {it.label for it in items} == set(CLASSES) and all(it.path.is_file() for it in items)
    assert all(it.patient_id is None for it in read_labels(synthetic_csv, CLASSES, training_only=True))


def test_a_volume_row_gives_the_pipelines_chosen_slices(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Cast(make_chest_phantom().image, sitk.sitkInt16), str(tmp_path / "case.nii.gz"))
    (tmp_path / "volumes.csv").write_text("path,label,patient_id\ncase.nii.gz,COVID,C1\n")
    prepared = prepare_set(read_labels(tmp_path / "volumes.csv", CLASSES), CLASSES, 64)
    assert 1 < len(prepared) <= DEFAULT_COUNT and set(prepared.patients) == {f"{tmp_path.name}/C1"}
    assert prepared.images.dtype == np.uint8 and prepared.masks.any((1, 2)).all()
    assert (prepared.images[~prepared.masks] == 0).mean() > 0.95  # outside the lungs is zeroed (up to the resampled rim)


def test_warmup_then_step_decay():
    factor = _lr_factor(TrainConfig(epochs=10, lr_decay_at=0.5, lr_decay=0.1, warmup_epochs=1.0), steps_per_epoch=4)
    assert [round(factor(s), 3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert factor(19) == 1.0 and factor(20) == pytest.approx(0.1)  # decay from epoch 6 (step 20)
    assert _lr_factor(TrainConfig(warmup_epochs=0.0), 4)(0) == 1.0


@pytest.mark.parametrize("mode", BATCHNORM_MODES)
def test_batchnorm_mode_decides_whether_statistics_move(synthetic_csv, tmp_path, mode):
    config = TrainConfig(model="plain", input_size=64, epochs=1, batch_size=4, pretrained=False, batchnorm=mode)
    train([synthetic_csv], tmp_path / "run", config, progress=False)
    model, _ = load_baseline(tmp_path / "run" / BEST_PT)
    stem_bn = model.backbone._bn0
    moved = not torch.allclose(stem_bn.running_mean, torch.zeros_like(stem_bn.running_mean))
    assert moved == (mode == "train")


@pytest.mark.parametrize("name, channels", [("densenet121", 1024), ("vgg16", 512), ("resnet50", 2048)])
def test_torchvision_backbones_give_a_stride_32_map(name, channels):
    net = build_backbone(name)
    assert net.out_channels == channels
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, channels, 2, 2)


def test_compare_trains_drenet_and_a_baseline_on_one_split_and_resumes(synthetic_csv, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    commands.add_compare_arguments(parser)
    args = parser.parse_args(["--data", str(synthetic_csv), "--out", str(tmp_path / "cmp"), "--baselines", "efficientnet_lite0",
                              "--input-size", "64", "--epochs", "1", "--batch-size", "8", "--no-pretrained", "--quiet"])
    assert commands.run_compare(args) == 0
    out = tmp_path / "cmp"
    report = json.loads((out / COMPARISON_JSON).read_text())
    assert [(r["model"], r["backbone"]) for r in report["rows"]] == [("drenet", "efficientnet_lite0"), ("plain", "efficientnet_lite0")]
    assert load_split(out / "drenet-efficientnet_lite0" / SPLIT_JSON) == load_split(out / "plain-efficientnet_lite0" / SPLIT_JSON)
    assert report["test_patients"] == 4 and all(0.0 <= r["image"]["auc"] <= 1.0 for r in report["rows"])
    table = (out / COMPARISON_MD).read_text()
    assert "| DRENet | efficientnet_lite0 | image |" in table and "| plain classifier | efficientnet_lite0 | image |" in table
    assert isinstance(load_baseline(out / "plain-efficientnet_lite0" / BEST_PT)[0], PlainClassifier)

    best = out / "plain-efficientnet_lite0" / BEST_PT
    stamp = best.stat().st_mtime_ns
    capsys.readouterr()
    assert commands.run_compare(args) == 0  # the same options: both runs are complete and reused
    assert "complete at 1 epochs" in capsys.readouterr().err and best.stat().st_mtime_ns == stamp
    assert json.loads((out / COMPARISON_JSON).read_text())["rows"][1]["train_minutes_this_call"] is None
    args.epochs = 2  # more epochs: each run is trained on, and says so
    assert commands.run_compare(args) == 0
    assert capsys.readouterr().err.count("continuing from epoch 2 to 2 (the run was planned for 1)") == 2
    assert [r["epochs_trained"] for r in json.loads((out / COMPARISON_JSON).read_text())["rows"]] == [2, 2]
    args.epochs, args.lr = None, 0.5  # another recipe: refused before anything is trained
    with pytest.raises(UsageError, match="lr 0.5"):
        commands.run_compare(args)
    assert len(json.loads((out / "drenet-efficientnet_lite0" / HISTORY_JSON).read_text())) == 2


def test_evaluate_split_on_a_copy_of_the_data_and_a_clear_error_without_it(synthetic_csv, tmp_path):
    import argparse
    import shutil

    copy = tmp_path / "elsewhere" / synthetic_csv.parent.name
    shutil.copytree(synthetic_csv.parent, copy)
    run = tmp_path / "run"
    train([copy / "labels.csv"], run, TrainConfig(input_size=64, epochs=1, batch_size=8, pretrained=False), progress=False)
    shutil.rmtree(copy)  # the training data is gone from this "machine"
    with pytest.raises(InputNotFoundError, match="--data"):
        load_test_items(run / BEST_PT, CLASSES)
    test_items = load_test_items(run / BEST_PT, CLASSES, [synthetic_csv])  # the same data in another place
    assert sorted(it.patient_id for it in test_items) == load_split(run / SPLIT_JSON)["test"]
    parser = argparse.ArgumentParser()
    commands.add_evaluate_arguments(parser)
    args = parser.parse_args(["--model", str(run / BEST_PT), "--split", str(run / BEST_PT), "--data", str(synthetic_csv),
                              "--out", str(tmp_path / "ev"), "--quiet"])
    assert commands.run_evaluate(args) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_images"] == len(test_items)


def test_train_can_reuse_the_split_of_a_model_file(synthetic_csv, tmp_path):
    first = train([synthetic_csv], tmp_path / "a", TrainConfig(input_size=64, epochs=1, batch_size=8, pretrained=False, seed=0),
                  progress=False)
    again = train([synthetic_csv], tmp_path / "b", TrainConfig(input_size=64, epochs=1, batch_size=8, pretrained=False, seed=5),
                  split=read_split(tmp_path / "a" / BEST_PT), progress=False)
    assert again.split == first.split == read_split(tmp_path / "b" / SPLIT_JSON)
    assert split_by_patient(read_labels(synthetic_csv, CLASSES), 5) != first.split  # seed 5 alone would split differently


def test_compare_without_torchvision_weights_stops_at_once_with_one_line(synthetic_csv, tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision.models

    from CovidCTDiagnosisLib.cli import main
    from CovidCTDiagnosisLib.errors import ModelFileError

    real = torchvision.models.densenet121

    def offline(*, weights=None):
        if weights is not None:
            raise urllib.error.URLError("no internet")
        return real(weights=None)

    monkeypatch.setattr(torchvision.models, "densenet121", offline)
    code = main(["compare", "--data", str(synthetic_csv), "--out", str(tmp_path / "cmp"), "--baselines", "densenet121",
                 "--input-size", "64", "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == ModelFileError.exit_code and len(err.splitlines()) == 1
    assert "densenet121" in err and "efficientnet_lite0" in err
    assert not (tmp_path / "cmp").exists()  # nothing was trained or written


def test_bad_training_data_gives_one_line_and_leaves_no_run_folder(synthetic_csv, tmp_path, capsys):
    from CovidCTDiagnosisLib.cli import main
    from CovidCTDiagnosisLib.errors import UnreadableInputError

    code = main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "run1"), "--quiet"])
    assert code == InputNotFoundError.exit_code and len(capsys.readouterr().err.strip().splitlines()) == 1
    no_ids = tmp_path / "no_ids.csv"
    rows = [f"{synthetic_csv.parent / f'img{i}.png'},{'COVID' if i % 2 else 'NonCOVID'}" for i in range(8)]
    no_ids.write_text("\n".join(["path,label", *rows]) + "\n")
    code = main(["train", "--data", str(no_ids), "--out", str(tmp_path / "run2"), "--input-size", "64", "--no-pretrained", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == UnreadableInputError.exit_code and "patient_id" in err and len(err.splitlines()) == 1
    code = main(["compare", "--data", str(no_ids), "--out", str(tmp_path / "cmp"), "--baselines", "efficientnet_lite0",
                 "--input-size", "64", "--no-pretrained", "--quiet"])
    assert code == UnreadableInputError.exit_code
    assert not any((tmp_path / name).exists() for name in ("run1", "run2", "cmp"))


def test_evaluate_refuses_an_ensemble_whose_members_read_different_inputs(synthetic_csv, tmp_path):
    from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig
    from CovidCTDiagnosisLib.errors import ModelFileError

    members = [DRENet(DRENetConfig(input_size=64)), DRENet(DRENetConfig(input_size=128))]
    with pytest.raises(ModelFileError, match="cannot average"):
        evaluate(members, synthetic_csv, tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


def _labels_csv(path, rows) -> str:
    path.write_text("\n".join(["path,label,patient_id", *(",".join(map(str, r)) for r in rows)]) + "\n")
    return str(path)


def test_training_data_that_cannot_train_or_select_a_model_is_refused_in_one_line(synthetic_csv, tmp_path, capsys):
    """Found by a new user: a header-only CSV, one class, too few patients, a missing image of a test patient and a
    file as --out were trained on (val AUC None), crashed, or named the wrong cause; each is now one line, the
    documented exit code, and no run folder."""
    from CovidCTDiagnosisLib.cli import main
    from CovidCTDiagnosisLib.errors import UnreadableInputError

    images = [(synthetic_csv.parent / f"img{i}.png", "COVID" if i % 2 == 0 else "NonCOVID", f"P{i}") for i in range(16)]
    cases = {
        "header only": (_labels_csv(tmp_path / "empty.csv", []), UnreadableInputError, "no rows"),
        "one class": (_labels_csv(tmp_path / "covid.csv", [r for r in images if r[1] == "COVID"]), UnreadableInputError,
                      "hold no Non-COVID-19"),
        "three patients": (_labels_csv(tmp_path / "three.csv", images[:3]), UnreadableInputError,
                           "3 patients are too few for the split by patient"),
        "a missing image": (_labels_csv(tmp_path / "gone.csv", [*images, (tmp_path / "gone.png", "COVID", "P99")]),
                            InputNotFoundError, f"1 of the 17 labelled images are not there, e.g. {tmp_path / 'gone.png'}"),
    }
    for name, (csv_path, error, message) in cases.items():
        code = main(["train", "--data", csv_path, "--out", str(tmp_path / "run"), "--input-size", "64", "--no-pretrained",
                     "--epochs", "1", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == error.exit_code and message in err and len(err.splitlines()) == 1, (name, err)
        assert not (tmp_path / "run").exists(), name
    (tmp_path / "a-file").write_text("")
    code = main(["train", "--data", str(synthetic_csv), "--out", str(tmp_path / "a-file"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == OutputError.exit_code and "not a folder" in err and len(err.splitlines()) == 1


def test_evaluate_without_images_to_score_and_fine_tuning_into_other_classes_are_refused(synthetic_csv, tmp_path, capsys):
    from CovidCTDiagnosisLib.cli import main
    from CovidCTDiagnosisLib.errors import NoLungsError, UnreadableInputError

    run = tmp_path / "run"
    train([synthetic_csv], run, TrainConfig(input_size=64, epochs=1, batch_size=8, pretrained=False), progress=False)
    model = str(run / BEST_PT)
    cv2.imwrite(str(tmp_path / "black.png"), np.zeros((128, 128), np.uint8))
    blank = _labels_csv(tmp_path / "blank.csv", [(tmp_path / "black.png", "COVID", "B1")])
    others = _labels_csv(tmp_path / "others.csv", [(synthetic_csv.parent / "img0.png", "COVID", "Q1")])  # no test patient
    (tmp_path / "a-file").write_text("")
    for argv, error, message in (
        (["--data", blank, "--out", str(tmp_path / "e1")], NoLungsError, "none of the 1 images has lungs"),
        (["--split", model, "--data", others, "--out", str(tmp_path / "e2")], UnreadableInputError, "test patients recorded in"),
        (["--data", str(synthetic_csv), "--out", str(tmp_path / "a-file")], OutputError, "not a folder"),
    ):
        code = main(["evaluate", "--model", model, *argv, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == error.exit_code and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()
    code = main(["train", "--init", model, "--classes", "COVID-19", "Non-COVID-19", "Pneumonia", "--data", str(synthetic_csv),
                 "--out", str(tmp_path / "ft"), "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == UsageError.exit_code and "the --init model's classes are COVID-19 Non-COVID-19" in err
    assert not (tmp_path / "ft").exists()
