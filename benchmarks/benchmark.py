"""Speed of the CovidCT engine, measured in one run on this machine; prints times and ratios.

1. End to end `analyze` + all output files with the default model (the bundled one, else the
   same architecture untrained) on P001-covid (../shared/data) or, without it, the demo
   phantom: each stage's time, the network's share and the rest, against the targets
   (total <= 5 s, everything but the network <= 3 s on a 2-core CPU).
2. The paper's ResNet50 DRENet: the network stage (forward + Grad-CAM) against the bare
   backbone passes on the same tensors (whole images, crops, generated images): target <= 1.2x.
3. Start-up: `covidct --help` against a bare `python -c "import torch"`, each a fresh process,
   median of START_RUNS: target <= 1.5x (the command line imports a command's code only when it runs).
4. Batch throughput, cases per minute: the plain batch and `batch --ray` on a local Ray cluster with
   1 and 2 workers (RAY_WORKERS), each over the same RAY_CASES cases (P001-covid and normal001-normal
   in turn in a manifest, or demo phantom files). The cluster is started before the clock; each run's
   time includes its workers loading the model. Then the command line, start-up included (target
   BATCH_TARGET_PER_MIN, issue 12): one `covidct batch` of all the cases, and the cases split in
   halves over two `covidct batch --threads 1` side by side. Needs the `ray` extra.
5. What a user waits for: `covidct analyze <P001 or the phantom> --out DIR --quiet`, process start
   to exit, against a bare `python -c "import torch"` in the same run, fresh processes taken in
   turn, median of START_RUNS: target <= 2.5x (issue 12; the machine's speed cancels out).
6. Memory: peak memory of `covidct analyze` (a fresh process, model loading included, and its child
   that reads the CT: the larger of the largest process's exact peak RSS and, on Linux, the sum of
   both processes' proportional set sizes and the shared memory the child's result comes back
   through, sampled every SAMPLE_S) on
   P001 (or the phantom), target <= 1.5 GB (issue 12), and on a CT of the largest accepted size
   (`volume_io.MAX_VOXELS` voxels: P001's or the phantom's slices repeated to 512 x 512 x K),
   target < 4 GB (issue 11).
Run: `make benchmark` or `.venv/bin/python benchmarks/benchmark.py [--device cuda] [--repeats N] [--only PART]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from CovidCTDiagnosisLib.checkpoint import default_model_path
from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig
from CovidCTDiagnosisLib.inference import SliceScorer, full_float32, resolve_device
from CovidCTDiagnosisLib.outputs import write_outputs
from CovidCTDiagnosisLib.phantom import make_demo_phantom
from CovidCTDiagnosisLib.pipeline import Analyzer

P001 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct" / "covid-ct-md" / "P001-covid"
NORMAL001 = P001.parent / "normal001-normal"
TOTAL_TARGET_S = 5.0
NON_NETWORK_TARGET_S = 3.0
RESNET_RATIO_TARGET = 1.2
START_RATIO_TARGET = 1.5
ANALYZE_RATIO_TARGET = 2.5  # `covidct analyze`, start to exit, against a bare torch import
START_RUNS = 3
RAY_CASES = 6
BATCH_TARGET_PER_MIN = 30.0  # `covidct batch`, start-up included (issue 12)
RAY_WORKERS = (1, 2)
NETWORK_STAGES = ("network",)


def best_of(repeats: int, fn):
    """Minimum wall time over `repeats` calls (after one warm-up call), and the last return value."""
    value = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), value


def end_to_end(device: str, repeats: int) -> None:
    model = str(default_model_path()) if default_model_path() else "untrained"
    analyzer = Analyzer(model, device)
    if P001.is_dir():
        source, name = P001, "P001-covid (148-slice JPEG-lossless DICOM)"
    else:
        source, name = make_demo_phantom().image, "demo phantom (../shared/data absent)"
    print(f"== end to end: {name}, model {analyzer.model_info.name}, device {analyzer.scorer.device}")

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            result = analyzer.analyze(source)
            analysed = time.perf_counter()
            write_outputs(result, result.ct, Path(tmp) / "out")
            result.timings["write outputs"] = time.perf_counter() - analysed
            return result

    total, result = best_of(repeats, run)
    stages = result.timings
    network = sum(stages[s] for s in NETWORK_STAGES)
    for stage, seconds in stages.items():
        print(f"  {stage:<16} {seconds:7.3f} s")
    print(f"  {'total':<16} {total:7.3f} s   target <= {TOTAL_TARGET_S} s: ratio {total / TOTAL_TARGET_S:.2f}")
    rest = total - network
    print(f"  {'not network':<16} {rest:7.3f} s   target <= {NON_NETWORK_TARGET_S} s: ratio {rest / NON_NETWORK_TARGET_S:.2f}")


def resnet_overhead(device: str, repeats: int, slices: int) -> None:
    dev = resolve_device(device)
    torch.manual_seed(0)
    net = DRENet(DRENetConfig(backbone="resnet50"))
    scorer = SliceScorer(net, device)
    size = net.config.input_size
    images = np.random.default_rng(0).random((slices, size, size), dtype=np.float32)
    print(f"== ResNet50 DRENet, {slices} slices at {size} px, device {dev}")
    t_net, _ = best_of(repeats, lambda: scorer.score(images, explain_class=0))
    t_fwd, _ = best_of(repeats, lambda: scorer.score(images, explain_class=0, with_cam=False))

    x = torch.from_numpy(images).to(dev)[:, None].expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), full_float32(dev):
        out = scorer.model(x)
        crops = scorer.model.crop_regions(x, out.region_boxes).contiguous(memory_format=torch.channels_last)
        k = net.config.top_k
        generated = scorer.model.generate_image(x, out.region_boxes[:, :k], torch.softmax(out.region_scores[:, :k], 1))
        generated = generated.contiguous(memory_format=torch.channels_last)

    def bare():
        with torch.no_grad(), full_float32(dev):
            for chunk in range(0, slices, scorer.chunk):
                part = slice(chunk, chunk + scorer.chunk)
                scorer.model.features(x[part])
                scorer.model.features(crops[part.start * k : part.stop * k])
                scorer.model.features(generated[part])

    t_bare, _ = best_of(repeats, bare)
    print(f"  bare backbone passes  {t_bare:7.3f} s  (whole images, {slices * k} crops, generated images)")
    print(f"  DRENet forward        {t_fwd:7.3f} s  ratio {t_fwd / t_bare:.3f}")
    print(f"  forward + Grad-CAM    {t_net:7.3f} s  ratio {t_net / t_bare:.3f}  target <= {RESNET_RATIO_TARGET}")
    print(f"  Grad-CAM alone        {t_net - t_fwd:7.3f} s")


def start_up(runs: int = START_RUNS) -> None:
    def median_seconds(argv) -> float:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_help = median_seconds(["-m", "CovidCTDiagnosisLib.cli", "--help"])
    t_torch = median_seconds(["-c", "import torch"])
    print(f"== start-up, median of {runs} fresh processes each")
    print(f"  python -c 'import torch'  {t_torch:7.3f} s")
    print(f"  covidct --help            {t_help:7.3f} s  ratio {t_help / t_torch:.3f}  target <= {START_RATIO_TARGET}")


def batch_throughput(device: str, cases: int = RAY_CASES) -> None:
    import ray

    from CovidCTDiagnosisLib.batch import run_batch

    analyzer = Analyzer(str(default_model_path()) if default_model_path() else "untrained", device)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "cases.csv"
        if P001.is_dir() and NORMAL001.is_dir():
            paths, name = [(P001, NORMAL001)[n % 2] for n in range(cases)], "P001-covid and normal001-normal in turn"
        else:
            paths, name = [Path(tmp) / f"phantom{n}.nrrd" for n in range(cases)], "demo phantom"
            for n, path in enumerate(paths):
                sitk.WriteImage(make_demo_phantom(seed=n).image, str(path))
        manifest.write_text("case_id,path\n" + "".join(f"case{n},{path}\n" for n, path in enumerate(paths)))
        print(f"== batch throughput: {cases} cases ({name}), model {analyzer.model_info.name}")

        def cases_per_minute(out: str, **ray_options) -> float:
            start = time.perf_counter()
            outcomes = run_batch(analyzer, manifest, Path(tmp) / out, **ray_options)
            assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes]
            return cases / (time.perf_counter() - start) * 60

        print(f"  plain batch            {cases_per_minute('plain'):6.2f} cases/min")
        ray.init(address="local", include_dashboard=False, object_store_memory=100 * 2**20, logging_level="WARNING",
                 log_to_driver=False)
        try:
            print(f"  Ray cluster: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {ray.cluster_resources().get('GPU', 0):.0f} GPUs")
            for workers in RAY_WORKERS:
                rate = cases_per_minute(f"ray{workers}", ray="local", workers=workers)
                print(f"  Ray, {workers} worker{'s' if workers > 1 else ' '}        {rate:6.2f} cases/min")
        finally:
            ray.shutdown()
        lines = manifest.read_text().splitlines(keepends=True)
        halves = [Path(tmp) / f"half{n}.csv" for n in range(2)]
        for n, half in enumerate(halves):
            half.write_text(lines[0] + "".join(lines[1 + n::2]))

        def command_line_rate(manifests: list[Path], *options: str) -> float:
            start = time.perf_counter()
            runs = [subprocess.Popen([sys.executable, "-m", "CovidCTDiagnosisLib.cli", "batch", str(m), "--out",
                                      str(Path(tmp) / f"cli-{m.stem}-{len(options)}"), "--quiet", *options]) for m in manifests]
            assert [run.wait() for run in runs] == [0] * len(runs)
            return cases / (time.perf_counter() - start) * 60

        one = command_line_rate([manifest])
        print(f"  covidct batch (start-up included)         {one:6.2f} cases/min  "
              f"ratio to target {one / BATCH_TARGET_PER_MIN:.3f}  target >= {BATCH_TARGET_PER_MIN:g}")
        split = command_line_rate(halves, "--threads", "1")
        print(f"  2 x covidct batch --threads 1 (halves)    {split:6.2f} cases/min  "
              f"ratio to target {split / BATCH_TARGET_PER_MIN:.3f}  ({split / one:.2f}x one batch)")


def command_line(runs: int = START_RUNS) -> None:
    """`covidct analyze` start to exit against `python -c "import torch"`, fresh processes in turn."""
    with tempfile.TemporaryDirectory() as tmp:
        if P001.is_dir():
            source, name = P001, "P001-covid"
        else:
            source, name = Path(tmp) / "phantom.nrrd", "demo phantom"
            sitk.WriteImage(make_demo_phantom().image, str(source), True)
        out = Path(tmp) / "out"
        analyze = ["-m", "CovidCTDiagnosisLib.cli", "analyze", str(source), "--out", str(out), "--quiet"]
        times = {"torch": [], "analyze": []}
        for _ in range(runs):
            for what, argv in (("torch", ["-c", "import torch"]), ("analyze", analyze)):
                start = time.perf_counter()
                subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL)
                times[what].append(time.perf_counter() - start)
        stages = json.loads((out / "report.json").read_text())["timings"]
    t_torch, t_analyze = statistics.median(times["torch"]), statistics.median(times["analyze"])
    print(f"== covidct analyze {name} --quiet, start to exit, median of {runs} fresh processes each, in turn")
    print(f"  python -c 'import torch'  {t_torch:7.3f} s")
    print(f"  covidct analyze           {t_analyze:7.3f} s  ratio {t_analyze / t_torch:.3f}  target <= {ANALYZE_RATIO_TARGET}")
    print("  its stages (last run): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))


SAMPLE_S = 0.02


def _peak_memory_mb(argv: list[str]) -> tuple[float, float | None]:
    """Peak memory (MB) of `python argv` and the processes it starts: the largest single process's peak RSS
    (exact, from the kernel), and the whole tree's (Linux; None elsewhere): the sum of the processes' Pss
    (shared pages split between those that map them) plus the system's shared memory above its level at
    start (the transfer of the command's child), sampled every SAMPLE_S, so a short spike may be missed."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    running = subprocess.Popen([sys.executable, "-c", probe, sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    sampled = Path("/proc/self/smaps_rollup").exists()

    def kib(path: str, name: str) -> int:
        try:
            with open(path) as f:
                return next((int(line.split()[1]) for line in f if line.startswith(name)), 0)
        except OSError:  # the process ended meanwhile
            return 0

    def tree(pid: int) -> list[int]:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return [pid]
        return [pid] + [q for child in children for q in tree(int(child))]

    shared_at_start, tree_peak = kib("/proc/meminfo", "Shmem:"), 0
    while sampled and running.poll() is None:
        pss = sum(kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in tree(running.pid))
        tree_peak = max(tree_peak, pss + max(0, kib("/proc/meminfo", "Shmem:") - shared_at_start))
        time.sleep(SAMPLE_S)
    out = running.communicate()[0]
    if running.returncode:
        raise subprocess.CalledProcessError(running.returncode, argv)
    largest = int(out.split()[-1]) / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    return largest, tree_peak / 1024 if sampled else None


def memory() -> None:
    """Peak memory of `covidct analyze` on a usual CT and on one of MAX_VOXELS voxels."""
    from CovidCTDiagnosisLib.volume_io import MAX_VOXELS, read_volume

    with tempfile.TemporaryDirectory() as tmp:
        if P001.is_dir():
            source, name = P001, "P001-covid"
            image = read_volume(P001).image
        else:
            source, name = Path(tmp) / "phantom.nrrd", "demo phantom"
            image = sitk.Cast(sitk.Round(make_demo_phantom().image), sitk.sitkInt16)
            sitk.WriteImage(image, str(source), True)
        base = sitk.GetArrayFromImage(image)
        rows = cols = 512
        slices = MAX_VOXELS // (rows * cols)
        repeat_k = -(-slices // len(base))
        big = np.repeat(base, repeat_k, axis=0)[:slices]
        big = np.repeat(np.repeat(big, -(-rows // base.shape[1]), axis=1), -(-cols // base.shape[2]), axis=2)[:, :rows, :cols]
        largest = sitk.GetImageFromArray(big.astype(np.int16))
        del big
        spacing = image.GetSpacing()
        largest.SetSpacing((spacing[0] * base.shape[2] / cols, spacing[1] * base.shape[1] / rows, spacing[2] / repeat_k))
        largest.SetOrigin(image.GetOrigin())
        largest.SetDirection(image.GetDirection())
        large_path = Path(tmp) / "largest.nrrd"
        sitk.WriteImage(largest, str(large_path), True)
        del largest
        print("== peak memory of `covidct analyze` (a fresh process and its child: the larger of the largest process's "
              "peak and the tree's sampled Pss + shared memory)")
        for what, path, target in ((name, source, 1.5 * 1024), (f"{cols} x {rows} x {slices} ({MAX_VOXELS / 1e6:.0f} M voxels, "
                                                                   "the most accepted)", large_path, 4 * 1024)):
            largest, whole = _peak_memory_mb(["-m", "CovidCTDiagnosisLib.cli", "analyze", str(path), "--out", str(Path(tmp) / "out"),
                                              "--quiet"])
            peak = max(largest, whole or 0)
            print(f"  {what:50s} {peak:7.0f} MB  ratio to target {peak / target:.3f}  target <= {target:.0f} MB  "
                  f"(largest process {largest:.0f} MB, process tree {'-' if whole is None else f'{whole:.0f}'} MB)")


PARTS = {"analysis": lambda args: end_to_end(args.device, args.repeats),
         "resnet": lambda args: resnet_overhead(args.device, args.repeats, args.slices),
         "start-up": lambda args: start_up(),
         "batch": lambda args: batch_throughput(args.device),
         "command-line": lambda args: command_line(),
         "memory": lambda args: memory()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--slices", type=int, default=15)
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable; default: all)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for part in args.only or PARTS:
        PARTS[part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
