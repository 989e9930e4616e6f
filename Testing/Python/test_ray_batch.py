"""`covidct batch --ray`: the same results as the plain batch, on a small local Ray cluster; workers killed mid-case.

The cluster has 2 CPUs, no dashboard and a small object store; it is shut down after the module. A watchdog
ends the test process if Ray hangs (bounded time).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from CovidCTDiagnosisLib import dicom_export
from CovidCTDiagnosisLib.batch import SUMMARY_CSV, run_batch
from CovidCTDiagnosisLib.checkpoint import save_checkpoint
from CovidCTDiagnosisLib.cli import main
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig
from CovidCTDiagnosisLib.errors import UsageError
from CovidCTDiagnosisLib.outputs import REPORT_JSON, is_complete
from CovidCTDiagnosisLib.phantom import make_chest_phantom
from CovidCTDiagnosisLib.pipeline import Analyzer
from CovidCTDiagnosisLib.ray_batch import RAY_EXTRA, plan_workers
from dicom_series import write_ct_series
from helpers_batch import phantom_cases, summary_rows

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' installs it")

WATCHDOG_S = 900  # the whole module; a hung cluster ends the run with a traceback instead of blocking CI
CLUSTER = {"num_cpus": 2, "include_dashboard": False, "object_store_memory": 100 * 2**20, "logging_level": "WARNING",
           "log_to_driver": False}


@pytest.fixture(scope="module", autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", DRENet(DRENetConfig(input_size=64)),
                               trained=False, metadata={"name": "tiny"}))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two phantoms of different lesions and noise (a .nrrd and a .mha) and a broken file."""
    folder = tmp_path_factory.mktemp("cases")
    phantom_cases(folder, make_chest_phantom(seed=0), ["a.nrrd"])
    phantom_cases(folder, make_chest_phantom(seed=1, lesions=()), ["b.mha"])
    (folder / "broken.nii.gz").write_bytes(b"garbage")
    return folder


@pytest.fixture()
def cluster():
    """A local cluster this process is connected to; run_batch(ray=...) then uses it and leaves it open."""
    ray.init(address="local", **CLUSTER)
    yield
    ray.shutdown()


def by_case(rows):
    return {r["case_id"]: r for r in rows}


def test_an_unreachable_cluster_is_one_line_before_anything_is_written(tmp_path, cases, tiny_model, capsys):
    assert not ray.is_initialized()
    code = main(["batch", str(cases), "--out", str(tmp_path / "out"), "--model", tiny_model, "--ray", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--ray auto: cannot connect to a Ray cluster" in err and not (tmp_path / "out").exists()


def test_ray_local_gives_the_plain_batch_results(tmp_path, cases, capsys):
    """`--ray local` starts a cluster, analyses on it and stops it: the same rows as the plain batch (the
    bundled model, whose probabilities differ between slices and cases)."""
    plain, on_ray = tmp_path / "plain", tmp_path / "ray"
    assert main(["batch", str(cases), "--out", str(plain), "--quiet"]) == 9
    code = main(["batch", str(cases), "--out", str(on_ray), "--ray", "local", "--workers", "2", "--progress", "lines"])
    out, err = capsys.readouterr()
    assert code == 9, err  # the broken case failed, the others were analysed
    assert not ray.is_initialized(), "the cluster it started is shut down"
    expected, got = by_case(summary_rows(plain / SUMMARY_CSV)), by_case(summary_rows(on_ray / SUMMARY_CSV))
    assert list(got) == list(expected) == ["a", "b", "broken"]
    assert list(summary_rows(on_ray / SUMMARY_CSV)[0]) == list(summary_rows(plain / SUMMARY_CSV)[0])  # same columns
    classes = ["COVID-19", "Non-COVID-19"]
    for case_id, row in expected.items():
        assert (got[case_id]["status"], got[case_id]["label"]) == (row["status"], row["label"])
        assert got[case_id]["involved_percent"] == row["involved_percent"]
        for c in classes:
            assert (got[case_id][c] == row[c] == "") or abs(float(got[case_id][c]) - float(row[c])) <= 1e-4
    for case_id in ("a", "b"):  # report.json: full precision
        a, b = (json.loads((folder / case_id / REPORT_JSON).read_text()) for folder in (plain, on_ray))
        assert a["patient"]["probabilities"] == pytest.approx(b["patient"]["probabilities"], abs=1e-4)
        assert len(a["slices"]) == len(b["slices"]) > 1
        for sa, sb in zip(a["slices"], b["slices"]):
            assert sa["index"] == sb["index"] and sa["probabilities"] == pytest.approx(sb["probabilities"], abs=1e-4)
    assert [expected[c]["status"] for c in expected] == ["done", "done", "failed"]
    assert expected["a"]["COVID-19"] != expected["b"]["COVID-19"]  # two different cases
    assert "PROGRESS 1.000 2 done, 1 failed, 0 running of 3 cases; about 0 s left" in out.splitlines()
    assert sorted(p.name for p in on_ray.iterdir()) == ["a", "b", SUMMARY_CSV]


def test_ray_rerun_skips_finished_cases_and_redoes_other_options(tmp_path, cases, tiny_model, cluster):
    analyzer = Analyzer(tiny_model)
    first = run_batch(analyzer, cases, tmp_path, ray="local", slices=3)
    assert [o.status for o in first] == ["done", "done", "failed"]
    again = run_batch(analyzer, cases, tmp_path, ray="local", slices=3)
    assert [o.status for o in again] == ["skipped", "skipped", "failed"]
    other = run_batch(analyzer, cases, tmp_path, ray="local", slices=7)
    assert [o.status for o in other] == ["done", "done", "failed"]
    assert [o.report["options"]["slices"] for o in other[:2]] == [7, 7]
    assert ray.is_initialized(), "a connection made by the caller is left open"


def test_ray_workers_write_the_dicom_objects_too(tmp_path, tiny_model, cluster):
    """--dicom-out goes through the same per-case path on a worker: result folder and DICOM folder per case."""
    reason = dicom_export.unavailable_reason()
    if reason:
        pytest.skip(reason)
    write_ct_series(make_chest_phantom().image, tmp_path / "cases" / "phantom")
    out, dicom = tmp_path / "out", tmp_path / "dicom"
    [outcome] = run_batch(Analyzer(tiny_model), tmp_path / "cases", out, dicom_out=dicom, ray="local")
    assert outcome.status == "done", outcome.error
    written = list((dicom / "phantom").iterdir())
    assert is_complete(out / "phantom") and written and all(p.suffix == ".dcm" for p in written)


def test_more_worker_threads_than_the_cluster_has_is_a_usage_error(tmp_path, cases, tiny_model, cluster, capsys):
    code = main(["batch", str(cases), "--out", str(tmp_path / "out"), "--model", tiny_model, "--ray", "auto",
                 "--workers", "2", "--threads-per-worker", "2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "2 Ray workers of 2 threads need 4 CPUs; the cluster has 2" in err and not (tmp_path / "out").exists()


class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) the first `times` Ray worker processes seen analysing a case (process title
    `ray::CaseWorker.analyse`)."""

    def __init__(self, times: int):
        super().__init__(daemon=True)
        self.times, self.killed, self.stop = times, [], threading.Event()

    def run(self):
        while len(self.killed) < self.times and not self.stop.wait(0.05):
            for pid in os.listdir("/proc"):
                if (pid.isdigit() and int(pid) not in self.killed and _title(pid).startswith("ray::CaseWorker.analyse")
                        and _descends_from_this_process(pid)):
                    time.sleep(0.5)  # well into the case
                    os.kill(int(pid), signal.SIGKILL)
                    self.killed.append(int(pid))
                    break


def _descends_from_this_process(pid: str) -> bool:
    """Whether process `pid` is a descendant of this one (a worker of the cluster this test started)."""
    while pid not in ("0", "1"):
        try:
            pid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]  # field 4: the parent's pid
        except (OSError, IndexError):
            return False
        if pid == str(os.getpid()):
            return True
    return False


def _title(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _run_with_killer(cases, out, tiny_model, times, workers):
    killer = WorkerKiller(times)
    killer.start()
    try:
        outcomes = run_batch(Analyzer(tiny_model), cases, out, ray="local", workers=workers)
    finally:
        killer.stop.set()
        killer.join(5)
    assert len(killer.killed) == times, "the workers were killed as planned"
    rows = summary_rows(out / SUMMARY_CSV)
    assert sorted(r["case_id"] for r in rows) == ["a", "b", "broken"], "every case exactly once"
    assert all(r["status"] in ("done", "failed") for r in rows)
    for r in rows:
        assert (r["status"] == "done") == is_complete(out / r["case_id"])
    assert sorted(p.name for p in out.iterdir()) == sorted([r["case_id"] for r in rows if r["status"] == "done"] + [SUMMARY_CSV]), \
        "nothing half-written: no staging folder, no folder of a failed case"
    return by_case(rows), outcomes


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes in /proc (Linux)")
def test_a_worker_killed_mid_case_has_its_case_retried_on_a_new_worker(tmp_path, cases, tiny_model, cluster):
    rows, _ = _run_with_killer(cases, tmp_path, tiny_model, times=1, workers=2)
    assert [rows[c]["status"] for c in ("a", "b", "broken")] == ["done", "done", "failed"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes in /proc (Linux)")
def test_a_case_whose_worker_dies_twice_fails_and_the_batch_goes_on(tmp_path, cases, tiny_model, cluster):
    rows, outcomes = _run_with_killer(cases, tmp_path, tiny_model, times=2, workers=1)  # one worker: case a, twice
    assert [rows[c]["status"] for c in ("a", "b", "broken")] == ["failed", "done", "failed"]
    assert "worker analysing it died 2 times" in rows["a"]["error"]


def test_workers_default_to_one_per_gpu_or_two_cpus_with_their_share_of_threads():
    assert plan_workers({"CPU": 2.0}, "auto", None, None) == (1, 2, 0.0)
    assert plan_workers({"CPU": 16.0}, "auto", None, None) == (8, 2, 0.0)
    assert plan_workers({"CPU": 16.0, "GPU": 2.0}, "auto", None, None) == (2, 8, 1.0)
    assert plan_workers({"CPU": 16.0, "GPU": 2.0}, "cpu", None, None) == (8, 2, 0.0)
    assert plan_workers({"CPU": 16.0, "GPU": 2.0}, "auto", 4, None) == (4, 4, 0.5)
    assert plan_workers({"CPU": 2.0}, "auto", 2, None) == (2, 1, 0.0)
    with pytest.raises(UsageError, match="2 Ray workers of 2 threads need 4 CPUs; the cluster has 2"):
        plan_workers({"CPU": 2.0}, "auto", 2, 2)


def test_without_ray_the_option_is_one_line_naming_the_extra(tmp_path, cases, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    code = main(["batch", str(cases), "--out", str(tmp_path / "out"), "--model", "untrained", "--ray", "local"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and RAY_EXTRA in err
    assert not (tmp_path / "out").exists()


def test_worker_options_need_ray(tmp_path, cases, capsys):
    code = main(["batch", str(cases), "--out", str(tmp_path / "out"), "--model", "untrained", "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--workers and --threads-per-worker need --ray" in err and not (tmp_path / "out").exists()


def test_the_analysis_path_does_not_import_ray():
    code = ("import sys; import CovidCTDiagnosisLib.batch, CovidCTDiagnosisLib.cli, CovidCTDiagnosisLib.pipeline; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_case_given_up_leaves_no_half_written_folder(tmp_path):
    """A case whose workers were killed MAX_ATTEMPTS times, the last while writing, leaves no hidden staging
    folder of its result or DICOM objects (the workers that wrote them are gone); other cases are untouched."""
    from CovidCTDiagnosisLib.batch import Case
    from CovidCTDiagnosisLib.ray_batch import MAX_ATTEMPTS, _given_up

    out, dicom = tmp_path / "out", tmp_path / "dicom"
    for leftover in (out / ".a.partial-0123abcd", out / ".a.previous-4567abcd", dicom / ".a.partial-89abcdef", out / "b"):
        leftover.mkdir(parents=True)
        (leftover / "report.json").write_text("{}")
    outcome = _given_up(Case("a", tmp_path / "a.nrrd"), out, dicom, RuntimeError("The actor died unexpectedly"))
    assert outcome.status == "failed" and f"died {MAX_ATTEMPTS} times" in outcome.error
    assert [p.name for p in out.iterdir()] == ["b"] and not any(dicom.iterdir())
