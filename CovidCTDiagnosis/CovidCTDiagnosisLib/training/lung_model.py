"""The lung network (`LungUNet`) and its training: whole lungs, lesions included, from healthy lungs.

No lung masks drawn by radiologists on diseased lungs can ship here, so the labels are the
threshold-based lungs (`lungs.extract_aerated_lungs`, on CT volumes; `lungs.threshold_lung_mask_2d` on
slice images of normal lungs), which are right where the lung is aerated. Lesions are then painted
into those lungs (ground-glass opacity, crazy paving, consolidation as blobs at the pleura and as
a dependent posterior band, as COVID-19 presents: Pan et al., Radiology 2020; Shi et al., Lancet
Infect Dis 2020) while the label keeps the whole lung, so the network learns the lung as the
region inside the pleura. Slices are then rotated by multiples of 90 degrees, flipped, cropped
tightly (cutting the chest wall and lungs), cut by field-of-view circles, and their intensity,
blur, noise and JPEG quality varied, as published figures and other scanners show them.

Run: `python -m CovidCTDiagnosisLib.training.lung_model --data ../shared/data --out lung-unet.pt`
(resumable: it continues from `--out`'s checkpoint while it has iterations left). It writes the
PyTorch weights (`--out`, what `--init` fine-tunes from) and their ONNX export beside them
(`lung-unet.onnx`, what `lung_net` runs on OpenCV; the export needs the `onnx` package: the
`train` extra). The shipped files were made in seven stages and an average (`--average`);
docs/training.md gives the commands.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..bundled_model import MODELS_DIR
from ..display import LUNG_WINDOW_LEVEL, LUNG_WINDOW_WIDTH
from ..geometry import orient_to_lps
from ..lung_net import LUNG_NET_SIZE
from ..lungs import extract_aerated_lungs, threshold_lung_mask_2d
from ..phantom import make_demo_phantom
from ..preprocessing import lung_window
from ..volume_io import hu_to_u8, read_image_2d, read_volume

LUNG_NET_CHANNELS = (16, 32, 64, 128)
LUNG_NET_FORMAT = "covidct-lung-unet"
LUNG_NET_WEIGHTS = MODELS_DIR / "lung-unet.pt"  # the shipped weights; lung_net.LUNG_NET_FILE is their ONNX export
ONNX_OPSET = 17
BASE_SIZE = 256  # base slices are stored at this size; crops are resized to LUNG_NET_SIZE
CT_VOLUMES = ("ct/covid-ct-md/P001-covid", "ct/covid-ct-md/normal001-normal", "ct/totalsegmentator-example/example_ct_sm.nii.gz")
NORMAL_SLICE_SET = "slices/mosmed-derived"  # its NonCOVID slices: healthy lungs from many scanners
MASK_FRACTION_RANGE = (0.08, 0.55)  # threshold masks of slice images outside this are not trusted as labels
LESION_PROBABILITY = 0.75
POSTERIOR_BAND_PROBABILITY = 0.6  # dependent consolidation, the hardest case for a threshold
BAND_MAX_FRACTION = 0.7  # the deepest band: this share of the lung's height (a 40 % band of P001 was missed)
PHANTOM_SEEDS = (0, 1)
NEGATIVE_PROBABILITY = 0.12  # blank, noise or text images: no lung at all (black ones most: black lungs in SOFT_TISSUE_WINDOW)
SOFT_TISSUE_WINDOW_PROBABILITY = 0.1  # slices shown in a mediastinal window (figures in papers): black lungs
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # that window: level, width (HU)


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class LungUNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) behind a stride-2 stem, one logit per pixel: (N, 1, S, S) -> (N, 1, S, S).

    The stem halves the resolution first, so the U-Net's levels run at S/2 ... S/16: a quarter
    of the cost of a full-resolution U-Net, which the CPU budget of a whole volume needs.
    """

    def __init__(self, channels=LUNG_NET_CHANNELS):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels[0], 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.down = nn.ModuleList()
        cin = channels[0]
        for c in channels:
            self.down.append(_DoubleConv(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for c in reversed(channels[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, c, 2, stride=2))
            self.merge.append(_DoubleConv(2 * c, c))
            cin = c
        self.head = nn.Sequential(nn.ConvTranspose2d(cin, cin, 2, stride=2), nn.ReLU(inplace=True), nn.Conv2d(cin, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, C0, S/2, S/2)
        skips = []
        for n, block in enumerate(self.down):
            x = block(x if n == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)  # (N, 1, S, S)


def load_lung_unet(path: Path | str = LUNG_NET_WEIGHTS) -> LungUNet:
    """A lung network weights file (`train`'s output) as a LungUNet in eval mode on the CPU; ValueError
    if it is not one."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != LUNG_NET_FORMAT:
        raise ValueError(f"{path} is not a {LUNG_NET_FORMAT} file")
    net = LungUNet(tuple(payload["channels"]))
    net.load_state_dict(payload["state_dict"])
    return net.eval()


def export_onnx(net: LungUNet, path: Path | str) -> Path:
    """Write the network as ONNX (input "slices" (N, 1, S, S) float32 in [0, 1], output "logits"
    (N, 1, S, S); N free), what `lung_net` runs on OpenCV's DNN module. Needs the `onnx` package."""
    import warnings

    example = torch.zeros(1, 1, LUNG_NET_SIZE, LUNG_NET_SIZE)
    with warnings.catch_warnings():  # the TorchScript-based exporter, chosen (dynamo=False: no onnxscript), warns it is old
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net.eval(), (example,), str(path), input_names=["slices"], output_names=["logits"],
                          dynamic_axes={"slices": {0: "n"}, "logits": {0: "n"}}, opset_version=ONNX_OPSET, dynamo=False)
    return Path(path)


def hu_u8(value_hu: float) -> float:
    """An HU value in the 8-bit lung window the network reads."""
    return float(hu_to_u8(np.array([value_hu]))[0])


def _base_from_volume(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    image = orient_to_lps(read_volume(path).image)
    hu = sitk.GetArrayViewFromImage(image)
    lungs = extract_aerated_lungs(hu, image.GetSpacing())
    out = []
    for k in range(hu.shape[0]):
        gray = cv2.resize(hu_to_u8(hu[k]), (BASE_SIZE, BASE_SIZE), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(lungs.mask[k].astype(np.uint8), (BASE_SIZE, BASE_SIZE), interpolation=cv2.INTER_NEAREST)
        out.append((gray, mask))
    return out


def _base_from_slices(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    with open(folder / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"].lower().startswith("non")]
    out = []
    for row in rows:
        gray = read_image_2d(folder / row["path"])
        mask = threshold_lung_mask_2d(gray)
        if MASK_FRACTION_RANGE[0] <= mask.mean() <= MASK_FRACTION_RANGE[1]:
            out.append((cv2.resize(gray, (BASE_SIZE, BASE_SIZE), interpolation=cv2.INTER_AREA),
                        cv2.resize(mask.astype(np.uint8), (BASE_SIZE, BASE_SIZE), interpolation=cv2.INTER_NEAREST)))
    return out


def _base_from_phantoms() -> list[tuple[np.ndarray, np.ndarray]]:
    """Every other slice of the demo's synthetic chest phantoms, with their drawn lungs."""
    out = []
    for seed in PHANTOM_SEEDS:
        phantom = make_demo_phantom(seed)
        image, labels = orient_to_lps(phantom.image), orient_to_lps(phantom.lung_labels)  # alive while viewed
        hu, truth = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(labels)
        for k in range(0, hu.shape[0], 2):
            out.append((cv2.resize(hu_to_u8(hu[k]), (BASE_SIZE, BASE_SIZE), interpolation=cv2.INTER_AREA),
                        cv2.resize((truth[k] > 0).astype(np.uint8), (BASE_SIZE, BASE_SIZE), interpolation=cv2.INTER_NEAREST)))
    return out


def load_real(data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image uint8, lung mask uint8) pairs at BASE_SIZE from the real data folder."""
    base = []
    for rel in CT_VOLUMES:
        if (data / rel).exists():
            base += _base_from_volume(data / rel)
    if (data / NORMAL_SLICE_SET / "labels.csv").exists():
        base += _base_from_slices(data / NORMAL_SLICE_SET)
    return base


# ---- lesions ------------------------------------------------------------------------------------

def _smooth_field(rng, shape, sigma: float) -> np.ndarray:
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return field / (field.std() + 1e-6)


def _blobs(rng, mask: np.ndarray) -> np.ndarray:
    """Lesion regions inside the lung, mostly at the pleura (peripheral, as in COVID-19)."""
    shape = mask.shape
    field = _smooth_field(rng, shape, rng.uniform(4, 14))
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    periphery = np.exp(-dist / rng.uniform(6, 30))
    score = field + rng.uniform(1.0, 3.0) * periphery
    inside = score[mask > 0]
    if inside.size == 0:
        return np.zeros(shape, bool)
    level = np.quantile(inside, 1 - rng.uniform(0.03, 0.45))
    return (score >= level) & (mask > 0)


def _posterior_band(rng, mask: np.ndarray) -> np.ndarray:
    """The dependent (posterior, bottom rows on the LPS-oriented slice) part of each lung."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    band = np.zeros(mask.shape, bool)
    rows = np.arange(mask.shape[0])[:, None]
    for n in range(1, count):
        top, height = stats[n, cv2.CC_STAT_TOP], stats[n, cv2.CC_STAT_HEIGHT]
        cut = top + height * (1 - rng.uniform(0.1, BAND_MAX_FRACTION))
        edge = cut + rng.choice([0.0, 4.0]) * _smooth_field(rng, (1, mask.shape[1]), 6)  # a level or a wavy top
        band |= (labels == n) & (rows >= edge)
    return band


def paint_lesions(rng, gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Ground-glass, crazy paving or consolidation painted into the lung of a uint8 slice."""
    out = gray.astype(np.float32)
    for _ in range(rng.integers(1, 4)):
        region = _posterior_band(rng, mask) if rng.random() < POSTERIOR_BAND_PROBABILITY else _blobs(rng, mask)
        alpha = cv2.GaussianBlur(region.astype(np.float32), (0, 0), rng.uniform(0.5, 2.0))
        kind = rng.choice(["ggo", "paving", "consolidation"], p=[0.4, 0.15, 0.45])
        texture = _smooth_field(rng, gray.shape, rng.uniform(0.7, 2.0))
        if kind == "consolidation":
            lesion = hu_u8(rng.uniform(-120, 60)) + rng.uniform(0, 8) * texture
            out = out * (1 - alpha) + lesion * alpha
        else:
            lesion = hu_u8(rng.uniform(-780, -350)) + rng.uniform(3, 12) * texture
            if kind == "paving":  # interlobular septal thickening over the ground glass
                lines = cv2.Canny((128 + 40 * _smooth_field(rng, gray.shape, 3)).clip(0, 255).astype(np.uint8), 30, 60)
                lesion = np.maximum(lesion, cv2.GaussianBlur(lines.astype(np.float32), (0, 0), 0.7) * 0.25 + lesion)
            out = np.maximum(out, out * (1 - alpha) + lesion * alpha)
    return np.clip(out, 0, 255).astype(np.uint8)


# ---- geometry and intensity -----------------------------------------------------------------------

def _crop_box(rng, mask: np.ndarray) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of a crop around the lungs: tight (cutting them) to loose."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    if len(xs) == 0:
        x0, y0, x1, y1 = 0.0, 0.0, float(w), float(h)
    else:
        x0, x1, y0, y1 = xs.min(), xs.max() + 1.0, ys.min(), ys.max() + 1.0
    bw, bh = x1 - x0, y1 - y0
    lo, hi = (-0.1, 0.35) if rng.random() < 0.6 else (0.2, 0.8)
    return (x0 - bw * rng.uniform(lo, hi), y0 - bh * rng.uniform(lo, hi),
            x1 + bw * rng.uniform(lo, hi), y1 + bh * rng.uniform(lo, hi))


def _warp(rng, gray: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = _crop_box(rng, mask)
    size = LUNG_NET_SIZE
    src = np.float32([[x0, y0], [x1, y0], [x0, y1]])
    dst = np.float32([[0, 0], [size, 0], [0, size]])
    matrix = cv2.getAffineTransform(src, dst)
    centre = (size / 2, size / 2)
    rotation = cv2.getRotationMatrix2D(centre, 90 * int(rng.integers(4)) + rng.uniform(-12, 12), 1.0)
    matrix = rotation @ np.vstack([matrix, [0, 0, 1]])
    image = cv2.warpAffine(gray, matrix, (size, size), flags=cv2.INTER_AREA, borderValue=0)
    label = cv2.warpAffine(mask.astype(np.float32), matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0) > 0.5
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def _field_of_view(rng, image: np.ndarray, label: np.ndarray) -> None:
    """Black outside a reconstruction circle that may cut the chest (in place)."""
    size = image.shape[0]
    yy, xx = np.mgrid[:size, :size]
    cx, cy = size / 2 + rng.uniform(-0.15, 0.15, 2) * size
    outside = (xx - cx) ** 2 + (yy - cy) ** 2 > (rng.uniform(0.35, 0.6) * size) ** 2
    image[outside] = 0
    label[outside] = False


def _soft_tissue_window(image: np.ndarray) -> np.ndarray:
    """A lung-window uint8 slice as it looks in SOFT_TISSUE_WINDOW: lungs and ground glass black, soft
    tissue grey (the lung window saturates above its top, so bone is grey here, not white)."""
    hu = LUNG_WINDOW_LEVEL - LUNG_WINDOW_WIDTH / 2 + image.astype(np.float32) * (LUNG_WINDOW_WIDTH / 255.0)
    return (lung_window(hu, *SOFT_TISSUE_WINDOW) * 255.0).astype(np.uint8)


def _intensity(rng, image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    x = np.clip(x * rng.uniform(0.75, 1.2) + rng.uniform(-0.12, 0.12), 0, 1) ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.2))
    x = np.clip(x + rng.normal(0, rng.uniform(0, 0.04), x.shape).astype(np.float32), 0, 1)
    if rng.random() < 0.4:
        ok, buf = cv2.imencode(".jpg", (x * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 95))])
        x = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    return x


def _negative(rng) -> np.ndarray:
    """An image with no lung: blank (black most often), noise or a page of text."""
    size = LUNG_NET_SIZE
    kind = rng.integers(3)
    if kind == 0:
        level = rng.integers(0, 16) if rng.random() < 0.5 else rng.integers(0, 256)
        return np.full((size, size), level, np.uint8)
    if kind == 1:
        if rng.random() < 0.5:
            return rng.integers(0, 256, (size, size)).astype(np.uint8)
        return np.clip(rng.normal(rng.uniform(0, 255), rng.uniform(5, 60), (size, size)), 0, 255).astype(np.uint8)
    page = np.full((size, size), 255, np.uint8)
    for row in range(8, size, 12):
        cv2.putText(page, "".join(rng.choice(list("abcdefghij COVID lung 0123")) for _ in range(20)), (2, row),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.3, 0, 1)
    return page if rng.random() < 0.5 else 255 - page


def sample(rng, base) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training pair: (S, S) float32 image in [0, 1], (S, S) bool lung label."""
    if rng.random() < NEGATIVE_PROBABILITY:
        return _intensity(rng, _negative(rng)), np.zeros((LUNG_NET_SIZE,) * 2, bool)
    gray, mask = base[rng.integers(len(base))]
    if mask.any() and rng.random() < LESION_PROBABILITY:
        gray = paint_lesions(rng, gray, mask)
    image, label = _warp(rng, gray, mask)
    if rng.random() < SOFT_TISSUE_WINDOW_PROBABILITY:
        image = _soft_tissue_window(image)
    if rng.random() < 0.15:
        _field_of_view(rng, image, label)
    return _intensity(rng, image), label


# ---- training -----------------------------------------------------------------------------------

def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


def train(base, out: Path, iterations: int, batch: int = 16, seed: int = 0, init: Path | None = None,
          max_lr: float = 2e-3, log=print) -> Path:
    """Train the lung network and save it to `out` and its ONNX export beside it (`out` with suffix
    .onnx); an interrupted run of the same length continues from `out`'s .state file (written every
    50 steps). `init`: start from a lung network weights file."""
    torch.manual_seed(seed)
    net = LungUNet(LUNG_NET_CHANNELS)
    if init is not None:
        net.load_state_dict(load_lung_unet(init).state_dict())
    optimiser = torch.optim.AdamW(net.parameters(), lr=max_lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=max_lr, total_steps=iterations, pct_start=0.1)
    step = 0
    state_file = out.with_suffix(".state")
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        if state["iterations"] != iterations:
            raise ValueError(f"{state_file} is a run of {state['iterations']} iterations, not {iterations}; resume it with those")
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
    rng = np.random.default_rng(seed + step)
    net.train()
    start = time.time()
    while step < iterations:
        pairs = [sample(rng, base) for _ in range(batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))[:, None]
        loss = _loss(net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
        step += 1
        if step % 50 == 0 or step == iterations:
            log(f"step {step}/{iterations} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
            torch.save({"net": net.state_dict(), "optimiser": optimiser.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "iterations": iterations}, state_file)
    return _save(net.eval(), out, iterations=iterations, seed=seed, init=None if init is None else Path(init).name)


def _save(net: LungUNet, out: Path, **provenance) -> Path:
    channels = [block[0].out_channels for block in net.down]
    torch.save({"format": LUNG_NET_FORMAT, "channels": channels, "state_dict": net.state_dict(), **provenance}, out)
    export_onnx(net, out.with_suffix(".onnx"))
    return out


def average(paths: list[Path], out: Path) -> Path:
    """Average lung network weights files of one fine-tuning lineage (a uniform "model soup",
    Wortsman et al., ICML 2022; batch-norm statistics averaged too) and save the result to `out`
    and its ONNX export beside it. Fine-tunes of the same start lie in one basin, so their average
    keeps what each learnt; it costs no training."""
    nets = [load_lung_unet(p) for p in paths]
    states = [n.state_dict() for n in nets]
    merged = {k: sum(s[k].float() for s in states) / len(states) if v.is_floating_point() else v for k, v in states[0].items()}
    nets[0].load_state_dict(merged)
    return _save(nets[0].eval(), out, averaged=[Path(p).name for p in paths])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="the real data folder (shared/data); needed to train")
    parser.add_argument("--out", type=Path, required=True, help="weights file to write (.pt; its ONNX export is written beside it)")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="continue from this lung network file (fine-tuning)")
    parser.add_argument("--max-lr", type=float, default=2e-3)
    parser.add_argument("--average", type=Path, nargs="+", metavar="PT",
                        help="instead of training: write the average of these lung network files to --out")
    args = parser.parse_args(argv)
    if args.average:
        average(args.average, args.out)
        return 0
    if args.data is None:
        parser.error("--data is needed to train")
    real = load_real(args.data)
    if not real:
        print(f"error: no CT volumes or normal slices found under {args.data}", file=sys.stderr)
        return 3
    base = _base_from_phantoms() + real
    print(f"{len(base)} base slices", flush=True)
    train(base, args.out, args.iterations, seed=args.seed, init=args.init, max_lr=args.max_lr, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
