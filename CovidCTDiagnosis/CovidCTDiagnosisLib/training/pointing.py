"""The pointing game: does the explanation point at radiologist-marked infection?

On slice images with infection masks (the Inf-Net slices: `<folder>/{train,test}/Imgs/<name>.jpg`
with `<folder>/{train,test}/GT/<name>.png`), each slice is prepared as `covidct score-images`
prepares it (lung mask, crop, model input) and scored as the analysis scores it (Grad-CAM of the
positive class, regions over the lungs unless `regions_over_lungs=False`). Two points per slice,
each mapped back to the original image's pixels:
- the Grad-CAM peak: the model-input pixel of the largest upsampled heat inside the lung mask, as
  the analysis shows the heat (zero outside the lungs); also reported without that mask
  ("gradcam_peak_unmasked");
- the centre of the top region (the best-scored of the K boxes).
A point is a hit when it lies within TOLERANCE_PX original-image pixels of an infection pixel
(Euclidean distance to the nearest one). Hit rates come with Wilson 95 % intervals.

    python -m CovidCTDiagnosisLib.training.pointing --model M --data <infnet folder> [--all-anchors] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np

TOLERANCE_PX = 7.0  # original-image pixels (the criterion)
Z95 = 1.959964
POINTS = ("gradcam_peak", "top_region_centre", "gradcam_peak_unmasked")


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion hits/n (95 % by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def slice_pairs(folder) -> list[tuple[Path, Path]]:
    """(image, infection mask) pairs under `folder`: every */Imgs/<name>.* with its */GT/<name>.png, sorted."""
    pairs = []
    for image in sorted(Path(folder).glob("*/Imgs/*")):
        gt = image.parent.parent / "GT" / (image.stem + ".png")
        if gt.is_file():
            pairs.append((image, gt))
    return pairs


def _hit(distance: np.ndarray, x: float, y: float, tolerance: float) -> bool:
    """Is point (x = column, y = row, original-image pixel index coordinates) within `tolerance` of infection?

    distance: (H, W) distance of each pixel to the nearest infection pixel; the point's nearest
    pixel is looked up (clipped into the image)."""
    h, w = distance.shape
    j, i = int(np.clip(round(y), 0, h - 1)), int(np.clip(round(x), 0, w - 1))
    return bool(distance[j, i] <= tolerance)


def pointing_game(model, folder, *, regions_over_lungs: bool = True, tolerance: float = TOLERANCE_PX, device: str = "cpu") -> dict:
    """Pointing-game hit rates of a DRENet (model file or module) on the slices under `folder`.

    Returns n (slices scored), skipped (slices without lungs, with reasons), per-point hits, rates
    and Wilson 95 % intervals ("gradcam_peak", "top_region_centre"), and per-slice rows.
    """
    import torch

    from ..checkpoint import load_model
    from ..errors import NoLungsError
    from ..inference import SliceScorer
    from ..preparation import prepare_image
    from ..preprocessing import crop_mask

    net = model if isinstance(model, torch.nn.Module) else load_model(model)[0]
    scorer = SliceScorer(net, device)
    cfg = scorer.config
    size, positive = cfg.input_size, cfg.classes.index(cfg.positive_class)
    prepared, skipped = [], []
    for image_path, gt_path in slice_pairs(folder):
        try:
            image, mask, crop = prepare_image(image_path, size)
        except NoLungsError as exc:
            skipped.append(f"{image_path}: {exc}")
            continue
        infection = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE) > 127  # (H, W), the original image's pixels
        if not infection.any():
            skipped.append(f"{image_path}: no infection marked")
            continue
        prepared.append((image_path, image, crop_mask(mask, size), crop, infection))  # crop_mask: (S, S) model-input pixels
    rows = []
    if prepared:
        lungs = np.stack([p[2] for p in prepared])
        scores = scorer.score(np.stack([p[1] for p in prepared]), explain_class=positive, lung_masks=lungs if regions_over_lungs else None)
    for n, (image_path, _, lung, crop, infection) in enumerate(prepared):
        distance = cv2.distanceTransform((~infection).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        peaks = {}
        for name, heat in (("gradcam_peak", scores.cams[n] * lung), ("gradcam_peak_unmasked", scores.cams[n])):
            py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)  # model-input pixel indices
            peaks[name] = crop.to_slice(px, py)  # original-image pixel index coordinates
        x0, y0, x1, y1 = scores.boxes[n, 0]  # model-input pixel edges
        centre = crop.to_slice((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5)  # edges -> pixel index coordinates
        rows.append({
            "image": str(image_path),
            "p_positive": float(scores.probabilities[n, positive]),
            **{name: [float(v) for v in point] for name, point in peaks.items()},
            "top_region_centre": [float(v) for v in centre],
            **{f"{name}_hit": _hit(distance, *point, tolerance) for name, point in peaks.items()},
            "top_region_centre_hit": _hit(distance, *centre, tolerance),
        })
    result = {"n": len(rows), "skipped": skipped, "tolerance_px": tolerance, "regions_over_lungs": regions_over_lungs}
    for point in POINTS:
        hits = sum(r[f"{point}_hit"] for r in rows)
        result[point] = {"hits": hits, "rate": hits / len(rows) if rows else None, "ci95": list(wilson_interval(hits, len(rows)))}
    result["slices"] = rows
    return result


def summary_line(result: dict) -> str:
    parts = [f"n {result['n']} slices"]
    for point in POINTS:
        r = result[point]
        parts.append(f"{point.replace('_', ' ')} {r['hits']}/{result['n']} = {r['rate']:.3f} (95 % CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f})")
    return "; ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a DRENet model file")
    parser.add_argument("--data", required=True, help="folder with */Imgs/<name>.jpg and */GT/<name>.png (the Inf-Net slices)")
    parser.add_argument("--all-anchors", action="store_true", help="choose regions among all anchors (not only those over the lungs)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE_PX, help="hit distance in original-image pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the full result (per slice too) here")
    args = parser.parse_args(argv)
    result = pointing_game(args.model, args.data, regions_over_lungs=not args.all_anchors, tolerance=args.tolerance, device=args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(summary_line(result))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])}: {result['skipped'][0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
