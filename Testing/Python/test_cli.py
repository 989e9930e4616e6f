"""The `covidct` command: results, bad input (one line, documented exit code, nothing left), batch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CovidCTDiagnosisLib.checkpoint import save_checkpoint
from CovidCTDiagnosisLib.cli import _slice_images, build_parser, main
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig
from CovidCTDiagnosisLib.outputs import OUTPUT_FILES
from CovidCTDiagnosisLib.result import UNTRAINED_NOTE


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small untrained DRENet file (64 px input), so that CLI tests run in seconds."""
    torch.manual_seed(0)
    net = DRENet(DRENetConfig(input_size=64))
    return str(save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", net, trained=False, metadata={"name": "tiny"}))


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory, phantom):
    path = tmp_path_factory.mktemp("ct") / "phantom.nrrd"
    sitk.WriteImage(phantom.image, str(path))
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_writes_every_file(tmp_path, ct_file, tiny_model, capsys):
    before = ct_file.read_bytes()
    out = tmp_path / "case"
    code, _, err = run(["analyze", ct_file, "--out", out, "--model", tiny_model, "--aggregate", "mean"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    report = json.loads((out / "report.json").read_text())
    assert report["patient"]["aggregation"] == "mean" and report["model"]["trained"] is False
    assert "UNTRAINED" in err and "not a diagnosis" in err
    assert ct_file.read_bytes() == before, "the input is never modified"
    # read while the model loaded in another thread: still timed, as the stages that follow
    assert list(report["timings"])[:4] == ["read", "lungs", "slices", "prepare"] and report["timings"]["read"] > 0


@pytest.mark.parametrize("command", ["analyze", "batch"])
def test_removed_noisy_or_is_a_one_line_usage_error(tmp_path, ct_file, command, capsys):
    code, _, err = run([command, ct_file, "--out", tmp_path / "o", "--model", "untrained", "--aggregate", "noisy-or"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "Noisy-OR was removed" in err and "use 'mean'" in err
    assert not (tmp_path / "o").exists()


def test_the_same_model_file_twice_is_refused(tmp_path, ct_file, tiny_model, capsys):
    code, _, err = run(["analyze", ct_file, "--out", tmp_path / "o", "--model", tiny_model, tiny_model, "--quiet"], capsys)
    assert code == 6 and len(err.strip().splitlines()) == 1 and "same model" in err
    assert not (tmp_path / "o").exists()


def test_progress_lines_for_other_programs(tmp_path, ct_file, tiny_model, capsys):
    code, out, _ = run(["analyze", ct_file, "--out", tmp_path / "o", "--model", tiny_model, "--progress", "lines", "--quiet"], capsys)
    lines = [l.split() for l in out.splitlines() if l.startswith("PROGRESS")]
    assert code == 0 and lines[-1][1] == "1.000" and len(lines) >= 5


def bad_inputs(tmp_path):
    png = tmp_path / "slice.png"
    sitk.WriteImage(sitk.Image([32, 32], sitk.sitkUInt8), str(png))
    constant = tmp_path / "constant.nrrd"
    sitk.WriteImage(sitk.Image([32, 32, 16], sitk.sitkInt16), str(constant))
    nan = tmp_path / "nan.nrrd"
    arr = np.full((16, 32, 32), -1000, np.float32)
    arr[3, 4, 5] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(nan))
    corrupt = tmp_path / "dicom"
    corrupt.mkdir()
    (corrupt / "1.dcm").write_bytes(b"DICM" + bytes(range(256)) * 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"missing": (tmp_path / "nope.nii.gz", 3), "2-D image": (png, 4), "constant": (constant, 4),
            "NaN": (nan, 4), "corrupt DICOM": (corrupt, 3), "empty folder": (empty, 3)}


def test_bad_inputs_one_line_and_nothing_left(tmp_path, tiny_model, capsys):
    for name, (path, expected) in bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        code, _, err = run(["analyze", path, "--out", out, "--model", tiny_model, "--quiet"], capsys)
        assert code == expected, f"{name}: exit {code}, stderr {err!r}"
        assert len(err.strip().splitlines()) == 1 and err.startswith("covidct: error:"), f"{name}: {err!r}"
        assert not out.exists(), f"{name}: output folder left behind"


def test_model_and_output_errors(tmp_path, ct_file, tiny_model, capsys):
    bad_model = tmp_path / "bad.pt"
    bad_model.write_text("not a model")
    code, _, err = run(["analyze", ct_file, "--out", tmp_path / "o", "--model", bad_model], capsys)
    assert code == 6 and "bad.pt" in err and not (tmp_path / "o").exists()
    as_file = tmp_path / "taken"
    as_file.write_text("a file where the output folder should go")
    code, _, err = run(["analyze", ct_file, "--out", as_file, "--model", tiny_model, "--quiet"], capsys)
    assert code == 7 and as_file.read_text().startswith("a file")
    code, _, err = run(["analyze", ct_file, "--out", tmp_path / "o2", "--model", tiny_model, "--slices", "many"], capsys)
    assert code != 0 and "--slices" in err


def _model_loaders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("covidct-model")]


def test_errors_come_as_if_the_model_were_loaded_before_the_input_is_read(tmp_path, tiny_model, capsys):
    """analyze loads the model in a worker thread while it reads the CT: a bad model file is reported
    before a bad input, each in one line, and the worker never outlives the command."""
    bad_model, missing = tmp_path / "bad.pt", tmp_path / "missing.nrrd"
    bad_model.write_text("not a model")
    code, _, err = run(["analyze", missing, "--out", tmp_path / "o", "--model", bad_model, "--quiet"], capsys)
    assert code == 6 and "bad.pt" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["analyze", missing, "--out", tmp_path / "o", "--model", tiny_model, "--quiet"], capsys)
    assert code == 3 and "missing.nrrd" in err and len(err.strip().splitlines()) == 1
    assert not _model_loaders() and not (tmp_path / "o").exists()


def test_the_model_loads_while_the_ct_is_read(tmp_path, ct_file, tiny_model, monkeypatch, capsys):
    """Loading the model and reading the CT meet half-way: each waits until the other has started."""
    from CovidCTDiagnosisLib import cli, preparation

    loading, reading = threading.Event(), threading.Event()
    load, find = cli._analyzer, preparation.find_ct_lungs

    def analyzer(args):
        loading.set()
        assert reading.wait(30), "the CT was not read while the model loaded"
        return load(args)

    def find_ct_lungs(*args, **kwargs):
        reading.set()
        assert loading.wait(30), "the model did not load while the CT was read"
        return find(*args, **kwargs)

    monkeypatch.setattr(cli, "_analyzer", analyzer)
    monkeypatch.setattr(preparation, "find_ct_lungs", find_ct_lungs)
    code, _, err = run(["analyze", ct_file, "--out", tmp_path / "o", "--model", tiny_model, "--quiet"], capsys)
    assert code == 0, err
    assert not _model_loaders()


def test_ctrl_c_while_the_model_loads_is_one_line_and_130(tmp_path, ct_file, tiny_model, monkeypatch, capsys):
    """Ctrl-C while the model loads: the command answers at once, not after the torch import it cannot interrupt
    (a trial waited 2.9 s); the loader thread ends on its own."""
    from CovidCTDiagnosisLib import cli, preparation

    release = threading.Event()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def loading(args):  # still importing torch
        release.wait(60)
        return None

    monkeypatch.setattr(preparation, "find_ct_lungs", interrupted)
    monkeypatch.setattr(cli, "_analyzer", loading)
    assert run(["analyze", ct_file, "--out", tmp_path / "o", "--model", tiny_model, "--quiet"], capsys)[::2] == (130, "covidct: interrupted\n")
    assert _model_loaders() and not (tmp_path / "o").exists()  # answered while the model was still loading
    release.set()
    for thread in _model_loaders():
        thread.join(30)
    assert not _model_loaders()


def test_sigterm_is_unwound_as_ctrl_c(tmp_path, ct_file, tiny_model):
    """`kill -TERM` (a job scheduler, a service stopping): one line, exit 143, nothing written, no child left; it
    was Python's default, an instant death that leaves a writer's staging folder behind."""
    import signal
    import time

    command = [sys.executable, "-m", "CovidCTDiagnosisLib.cli", "analyze", str(ct_file), "--out", str(tmp_path / "o"),
               "--model", tiny_model, "--quiet"]
    running = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # reading the CT in its child, importing torch
    children = Path(f"/proc/{running.pid}/task/{running.pid}/children")
    child = children.read_text().split() if children.exists() else []
    running.send_signal(signal.SIGTERM)
    out, err = running.communicate(timeout=120)
    assert (running.returncode, err) == (143, "covidct: terminated\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert all(not Path(f"/proc/{pid}").exists() for pid in child)


def test_leftovers_of_a_killed_run_are_removed(tmp_path, ct_file, tiny_model, capsys):
    """A run killed while writing (`kill -9`, Slicer's Cancel) leaves its hidden staging folder; the next run into
    the same --out removes it (batch did, analyze did not)."""
    leftover = tmp_path / ".o.partial-0123abcd"
    leftover.mkdir()
    (leftover / "report.json").write_text("{")
    code, _, err = run(["analyze", ct_file, "--out", tmp_path / "o", "--model", tiny_model, "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_no_lungs(tmp_path, tiny_model, capsys):
    arr = np.full((20, 64, 64), -1000, np.float32)
    arr[:, 8:56, 8:56] = 40
    water = tmp_path / "water.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(water))
    code, _, err = run(["analyze", water, "--out", tmp_path / "o", "--model", tiny_model], capsys)
    assert code == 5 and "lung" in err


def test_score_images_csv(tmp_path, tiny_model, capsys, phantom):
    hu = sitk.GetArrayFromImage(phantom.image)[24]
    png = tmp_path / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.clip((hu + 1450) / 1500 * 255, 0, 255).astype(np.uint8)), str(png))
    out = tmp_path / "scores.csv"
    code, _, err = run(["score-images", png, png, "--out", out, "--model", tiny_model], capsys)
    assert code == 0, err
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["path", "COVID-19", "Non-COVID-19", "note"] and len(rows) == 3
    assert rows[1][3] == UNTRAINED_NOTE  # an untrained network: the file says so, not only stderr
    assert float(rows[1][1]) + float(rows[1][2]) == pytest.approx(1, abs=1e-4)
    code, _, err = run(["score-images", png, "--out", out, "--model", tiny_model], capsys)  # the same command again
    assert code == 0, err
    assert len(list(csv.reader(out.open()))) == 2  # the CSV replaced, whole
    code, _, err = run(["score-images", png, "--out", tmp_path, "--model", tiny_model], capsys)
    assert code == 7 and "it is a folder" in err


def good_and_broken_cases(folder, ct_file):
    """A batch input folder: good.nrrd (the phantom) and broken.nii.gz (not a NIfTI)."""
    folder.mkdir()
    (folder / "good.nrrd").write_bytes(ct_file.read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"garbage")
    return folder


def test_batch_skips_bad_cases_and_finished_ones(tmp_path, ct_file, tiny_model, capsys):
    cases = good_and_broken_cases(tmp_path / "cases", ct_file)
    out = tmp_path / "results"
    code, _, err = run(["batch", cases, "--out", out, "--model", tiny_model], capsys)
    assert code == 9, err  # some cases failed (BATCH_CASES_FAILED)
    rows = {r["case_id"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["good"]["status"] == "done" and rows["broken"]["status"] == "failed" and rows["broken"]["error"]
    assert (out / "good" / "report.json").is_file() and not (out / "broken").exists()
    code, _, err = run(["batch", cases, "--out", out, "--model", tiny_model], capsys)
    rows = {r["case_id"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["good"]["status"] == "skipped" and rows["good"]["label"]


def _help(*command) -> str:
    return subprocess.run([sys.executable, "-m", "CovidCTDiagnosisLib.cli", *command, "--help"], capture_output=True,
                          text=True, check=True).stdout


def test_help_explains_commands_and_exit_codes():
    out = _help()
    for word in ("analyze", "batch", "score-images", "demo", "train", "evaluate", "compare", "exit codes", "Research use only"):
        assert word in out
    # the training commands' options, added when one of them is chosen
    train_help = _help("train")
    assert "--backbone" in train_help and "--resume" in train_help
    evaluate = build_parser().parse_args(["evaluate", "--model", "m.pt", "--split", "m.pt", "--out", "o"])
    compare = build_parser().parse_args(["compare", "--data", "l.csv", "--out", "o", "--baselines", "vgg16", "--epochs", "3"])
    assert (evaluate.split, compare.baselines, compare.epochs) == ("m.pt", ["vgg16"], 3)


def test_analyze_imports_no_training_code(tmp_path):
    """Slicer's Python (PythonSlicer) has no scikit-learn: building the parser, `analyze --help` and an
    analysis import neither the training package nor scikit-learn or matplotlib (nor torch before the analysis)."""
    missing, out = str(tmp_path / "missing.nrrd"), str(tmp_path / "out")
    script = f"""
import contextlib, io, json, sys
from CovidCTDiagnosisLib import cli
loaded = {{}}
cli.build_parser()
loaded["parser"] = sorted(sys.modules)
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    cli.main(["analyze", "--help"])
loaded["analyze --help"] = sorted(sys.modules)
code = cli.main(["analyze", {missing!r}, "--out", {out!r}, "--model", "untrained", "--device", "cpu", "--quiet"])
loaded["analyze"] = sorted(sys.modules)
print(json.dumps({{"code": code, "loaded": loaded}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["code"] == 3 and "missing.nrrd" in run.stderr  # got as far as reading the input
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr  # nothing from the model's thread at exit
    for stage, modules in report["loaded"].items():
        top = {m.split(".")[0] for m in modules}
        assert not top & {"sklearn", "matplotlib"}, stage
        assert not any(m.startswith("CovidCTDiagnosisLib.training") for m in modules), stage
    assert "torch" not in {m.split(".")[0] for m in report["loaded"]["analyze --help"]}
    assert "CovidCTDiagnosisLib.pipeline" in report["loaded"]["analyze"]


def test_ensemble_averages_slice_probabilities(tmp_path, ct_file, tiny_model, capsys):
    torch.manual_seed(5)
    other = str(save_checkpoint(tmp_path / "other.pt", DRENet(DRENetConfig(input_size=64)), trained=False))
    reports = {}
    for name, models in {"a": [tiny_model], "b": [other], "ab": [tiny_model, other]}.items():
        code, _, err = run(["analyze", ct_file, "--out", tmp_path / name, "--quiet", "--model", *models], capsys)
        assert code == 0, err
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    for sa, sb, sab in zip(*(reports[n]["slices"] for n in ("a", "b", "ab"))):
        for c in sa["probabilities"]:
            assert sab["probabilities"][c] == pytest.approx((sa["probabilities"][c] + sb["probabilities"][c]) / 2, abs=1e-5)
        assert sab["boxes"] == sa["boxes"]
    assert len(reports["ab"]["model"]["members"]) == 2 and reports["a"]["model"]["members"] == []
    three = str(save_checkpoint(tmp_path / "three.pt", DRENet(DRENetConfig(input_size=64, classes=("COVID-19", "CAP", "Healthy"))), trained=False))
    code, _, err = run(["analyze", ct_file, "--out", tmp_path / "mixed", "--model", tiny_model, three], capsys)
    assert code == 6 and "cannot average" in err and not (tmp_path / "mixed").exists()


def test_threads_limits_the_process_with_the_same_result(tmp_path, ct_file, tiny_model, capsys):
    """--threads 1: PyTorch (imported after the limit, beside the read), OpenCV, the reader's runs and the
    lung extraction's slices all use one thread, and the result is the one of all cores."""
    one = tmp_path / "one"
    script = f"""
import json
from CovidCTDiagnosisLib import cli, cpu_threads
code = cli.main(["analyze", {str(ct_file)!r}, "--out", {str(one)!r}, "--model", {tiny_model!r}, "--threads", "1", "--quiet"])
import cv2, torch, SimpleITK as sitk
limited = [torch.get_num_threads(), cv2.getNumThreads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
           cpu_threads.cpu_threads()]
refused = []
for bad in (0, 1.5, True, "2"):
    try:
        cpu_threads.limit_threads(bad)
    except ValueError as exc:
        refused.append(str(exc))
cpu_threads.limit_threads(10000)  # more than there are: every available CPU
print(json.dumps({{"code": code, "limited": limited, "refused": refused, "capped": cpu_threads.cpu_threads(),
                  "all": cpu_threads.available_cpus()}}))
"""
    limited = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    threads = json.loads(limited.stdout.splitlines()[-1])
    assert threads["code"] == 0 and limited.stderr == ""
    assert threads["limited"] == [1, 1, 1, 1]  # torch, OpenCV, SimpleITK, the reader and lung extraction
    assert len(threads["refused"]) == 4 and all("whole number of at least 1" in r for r in threads["refused"])
    assert threads["capped"] == threads["all"]
    code, _, err = run(["analyze", ct_file, "--out", tmp_path / "all", "--model", tiny_model, "--quiet"], capsys)
    assert code == 0, err
    reports = [json.loads((folder / "report.json").read_text()) for folder in (one, tmp_path / "all")]
    assert [s["index"] for s in reports[0]["slices"]] == [s["index"] for s in reports[1]["slices"]]
    for a, b in zip(reports[0]["slices"], reports[1]["slices"]):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    assert reports[0]["severity"]["lungs"] == reports[1]["severity"]["lungs"]  # the same lung masks


def test_threads_usage_errors(tmp_path, ct_file, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["batch", str(ct_file.parent), "--out", str(tmp_path / "out"), "--threads", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "--threads" in err
    code, _, err = run(["batch", ct_file.parent, "--out", tmp_path / "out", "--threads", "1", "--ray", "local"], capsys)
    assert code == 2 and err.strip() == "covidct: error: --threads limits this process; on Ray use --threads-per-worker"
    assert not (tmp_path / "out").exists()


def test_command_exits_with_main_code_after_flushing(tmp_path):
    """The `covidct` command (`cli.run`) ends the process at once after `main` (no interpreter teardown), with
    main's exit code and its buffered output delivered; a reader that went away costs no traceback."""
    script = """
import sys
from CovidCTDiagnosisLib import cli
def main():
    print("buffered result line")  # not flushed by main: run must deliver it
    print("buffered note", file=sys.stderr)
    return int(sys.argv[1])
cli.main = main
cli.run()
print("never reached")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as for most users
    done = subprocess.run([sys.executable, "-c", script, "7"], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (7, "buffered result line\n", "buffered note\n")
    gone = subprocess.Popen([sys.executable, "-c", script, "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    gone.stdout.close()  # the reader goes away before the command flushes
    assert gone.wait(timeout=60) == 0
    assert gone.stderr.read() == b"buffered note\n"  # no BrokenPipeError traceback


def test_module_command_analyzes_with_exit_code(tmp_path, ct_file, tiny_model):
    """`python -m CovidCTDiagnosisLib.cli` (how the Slicer module runs it): a complete result folder and exit 0;
    a missing input: one line and exit 3."""
    command = [sys.executable, "-m", "CovidCTDiagnosisLib.cli", "analyze"]
    done = subprocess.run([*command, str(ct_file), "--out", str(tmp_path / "out"), "--model", tiny_model, "--progress", "lines"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("PROGRESS 1.000")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["patient"]["label"]
    missing = subprocess.run([*command, str(tmp_path / "missing.nrrd"), "--out", str(tmp_path / "other")], capture_output=True, text=True)
    assert missing.returncode == 3 and len(missing.stderr.strip().splitlines()) == 1 and "missing.nrrd" in missing.stderr


def test_closed_streams_and_a_reader_that_goes_away(tmp_path, ct_file, tiny_model):
    """Started with stdout or stderr closed (`>&-`): the documented exit code, not a traceback from flushing a
    stream that is None (was exit 1); progress lines to a reader that goes away (`| head -1`): the analysis
    goes on and ends with exit 0, without a BrokenPipeError traceback."""
    module = f"{sys.executable} -m CovidCTDiagnosisLib.cli"
    for closed in (">&-", "2>&-"):
        done = subprocess.run(f"{module} analyze {tmp_path / 'missing.nrrd'} --out {tmp_path / 'x'} {closed}", shell=True,
                              capture_output=True, text=True)
        assert done.returncode == 3 and "Traceback" not in done.stderr + done.stdout, (closed, done.stderr)
    reading = subprocess.Popen([*module.split(), "analyze", str(ct_file), "--out", str(tmp_path / "out"), "--model", tiny_model,
                                "--progress", "lines"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reading.stdout.readline().startswith("PROGRESS ")
    reading.stdout.close()  # the reader goes away
    err = reading.stderr.read()
    assert reading.wait(timeout=300) == 0 and "Traceback" not in err, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["patient"]["label"]


def test_score_images_lists_a_folder_in_natural_order(tmp_path):
    """A scan's slices exported as slice_1 ... slice_100 are scored in that order, not as 1, 10, 100, 2."""
    for n in (1, 2, 10, 100):
        (tmp_path / f"slice_{n}.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [Path(p).name for p in _slice_images([str(tmp_path)])] == [f"slice_{n}.png" for n in (1, 2, 10, 100)]
