"""`report.html`: one self-contained page a radiologist can read, offline and without Slicer.

Everything is inline (CSS, images as base64 PNG), with no external references. The top slices are
drawn as a radiologist expects: axial, lung window, patient's right on the image's left and
anterior at the top (the CT reoriented with `geometry.orient_to_lps`).
"""

from __future__ import annotations

import base64
import io
import importlib
from html import escape
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry
from .bundled_model import MODEL_CARD_FILE
from .display import HEAT_COLORMAP, HEAT_OPACITY, HEAT_THRESHOLD, LUNG_WINDOW_LEVEL, LUNG_WINDOW_WIDTH
from .performance import trust_sentence
from .result import RESEARCH_USE_ONLY, UNTRAINED_WARNING, Result, SliceResult
from .segmentation_file import lesion_colors

FIGURE_DPI = 80
PANEL_INCHES = 4.0
PROBABILITY_BAR_EM = 10  # width of a probability bar at 100 %
AGGREGATION_TEXT = {"mean": "mean of the analysed slices' probabilities (the paper's method)"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
.notice { font-weight: bold; color: #8a4b00; background: #fff4e0; border: 1px solid #e0b060; padding: 0.5em 0.8em; }
.untrained { font-size: 1.4em; font-weight: bold; color: #fff; background: #c00; padding: 0.8em 1em; margin: 1em 0; }
.verdict { font-size: 2.4em; font-weight: bold; margin: 0.3em 0; }
.trust { font-weight: bold; border-left: 0.4em solid #c60; padding: 0.3em 0.8em; background: #fff4e0; }
.muted { color: #666; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.top td { background: #fff0e8; }
.bar { display: inline-block; height: 0.8em; background: #4a7ab0; vertical-align: middle; }
figure { margin: 1em 0; }
figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
.warnings li { color: #8a4b00; }
code { font-size: 0.9em; word-break: break-all; }
.zones td { width: 9em; height: 3.2em; text-align: center; }
"""
ZONE_SCORE_COLORS = ("#f4f4f4", "#fde9b8", "#f9c46b", "#f09a45", "#de5b2b", "#b3211b")  # score 0 .. 5


def render_html(result: Result, ct_image: sitk.Image) -> str:
    """The whole report page as one HTML string."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>CovidCT report: {escape(_input_name(result))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>COVID-19 chest CT analysis: {escape(_input_name(result))}</h1>",
        f'<p class="notice">{escape(RESEARCH_USE_ONLY)}</p>',
        _patient_section(result),
        _warnings_section(result),
        _severity_section(result),
        _figure_section(result, ct_image),
        _slices_section(result),
        _details_section(result),
        _timings_section(result),
        f'<p class="notice">{escape(RESEARCH_USE_ONLY)}</p>',
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _input_name(result: Result) -> str:
    return result.input.path or "in-memory image"


def _probability_table(probabilities: dict[str, float]) -> str:
    rows = "".join(
        f'<tr><td>{escape(c)}</td><td class="num">{100 * p:.1f} %</td>'
        f'<td><span class="bar" style="width:{PROBABILITY_BAR_EM * p:.2f}em"></span></td></tr>'
        for c, p in probabilities.items()
    )
    return f"<table><tr><th>class</th><th>probability</th><th></th></tr>{rows}</table>"


def _patient_section(result: Result) -> str:
    patient = result.patient
    method = escape(AGGREGATION_TEXT.get(patient.aggregation, patient.aggregation))
    n = len(result.slices)
    if not result.model.trained:
        return (
            f'<div class="untrained">{escape(UNTRAINED_WARNING)}</div>'
            "<h2>Patient-level result</h2><p><b>No result: the network is untrained.</b></p>"
            '<p class="muted">Outputs of the untrained network (meaningless), '
            f"{method}, over {n} slices:</p>{_probability_table(patient.probabilities)}"
        )
    return (
        "<h2>Patient-level result</h2>"
        f'<p class="verdict">{escape(patient.label)}</p>'
        f'<p class="trust">{escape(trust_sentence(result.model.performance))}{_card(result)}</p>'
        f"{_probability_table(patient.probabilities)}"
        f"<p>Aggregation: {method}, over {n} analysed slices. "
        f"Slices are ranked by P({escape(result.positive_class)}).</p>"
    )


def _card(result: Result) -> str:
    """A pointer to the model card beside the model file (its known limits), if there is one."""
    card = Path(result.model.file).parent / MODEL_CARD_FILE if result.model.file else None
    return f" Known limits: <code>{escape(str(card))}</code>." if card and card.is_file() else ""


def _warnings_section(result: Result) -> str:
    shown = [w for w in result.warnings if w != UNTRAINED_WARNING]  # that one is the banner
    if not shown:
        return ""
    items = "".join(f"<li>{escape(w)}</li>" for w in shown)
    return f'<h2>Warnings</h2><ul class="warnings">{items}</ul>'


def _severity_section(result: Result) -> str:
    """Measured involvement: a table per lung and a 3 x 2 picture of the zones (patient's right on the left)."""
    from .severity import CONSOLIDATION_HU, GROUND_GLASS_HU, METHOD, SCORE_NAME  # OpenCV: not for Load results
    sev = result.severity
    if sev is None:
        return ""
    lung_rows = "".join(
        f"<tr><td>{name}</td>" + "".join(f'<td class="num">{v:.1f}</td>' for v in (
            m.lung_ml, m.ground_glass_ml, m.ground_glass_percent, m.consolidation_ml, m.consolidation_percent, m.involved_percent))
        + "</tr>"
        for name, m in sev.lungs.items()
    )
    zones = {(z.lung, z.zone): z for z in sev.zones}
    cells = "".join(
        "<tr>" + "".join(
            f'<td style="background:{ZONE_SCORE_COLORS[zones[lung, zone].score]}">{lung} {zone}<br>'
            f"{zones[lung, zone].involved_percent:.1f} %: <b>{zones[lung, zone].score}</b></td>"
            if (lung, zone) in zones else "<td></td>"
            for lung in ("right", "left")
        ) + "</tr>"
        for zone in ("upper", "middle", "lower")
    )
    coverage = "".join(f'<p class="trust">{escape(n)}</p>' for n in sev.notes)
    return (
        "<h2>Lung involvement (measured from HU, not predicted)</h2>"
        f'<p class="verdict">{sev.score} / 30</p><p>{escape(SCORE_NAME)}: each zone (thirds of each lung\'s height) '
        "scores 0 (none), 1 (under 5 %), 2 (5 to 25 %), 3 (over 25 to 50 %), 4 (over 50 to 75 %) or 5 (over 75 %) by the share of it "
        f"involved. Bands: ground-glass {GROUND_GLASS_HU[0]:g} to {GROUND_GLASS_HU[1]:g} HU, consolidation "
        f"{CONSOLIDATION_HU[0]:g} to {CONSOLIDATION_HU[1]:g} HU; {escape(METHOD)}.</p>{coverage}"
        "<table><tr><th>lung</th><th>volume (mL)</th><th>ground-glass (mL)</th><th>(%)</th><th>consolidation (mL)</th>"
        f"<th>(%)</th><th>involved (%)</th></tr>{lung_rows}</table>"
        f'<figure><table class="zones">{cells}</table><figcaption>Zones, as on an axial image: the patient\'s right on '
        "the left; involved share and score per zone.</figcaption></figure>"
    )


def _figure_section(result: Result, ct_image: sitk.Image) -> str:
    png = _top_slices_png(result, ct_image)
    if png is None:
        return ""
    caption = (
        f"Most suspicious slices (highest P({escape(result.positive_class)})), axial, lung window "
        f"(level {LUNG_WINDOW_LEVEL:g}, width {LUNG_WINDOW_WIDTH:g} HU), patient's right on the left. "
        f"Colour overlay: Grad-CAM for {escape(result.positive_class)}. Boxes: the navigator's regions, "
        "labelled rank: score."
    )
    return (
        "<h2>Top slices</h2><figure>"
        f'<img alt="top slices with Grad-CAM and lesion boxes" src="data:image/png;base64,{png}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _top_slices_png(result: Result, ct_image: sitk.Image) -> str | None:
    """The top slices side by side as a base64 PNG, or None if there are none."""
    fig = top_slices_figure(result.slices, result.top_slices, result.positive_class, ct_image, result.gradcam)
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor=fig.get_facecolor())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def import_figure_modules() -> None:
    """Import what drawing the figure needs (matplotlib: about 0.7 s of Python on a 2-core CPU) ahead
    of time, e.g. in a thread while the analysis runs in C code that releases the GIL."""
    for name in ("matplotlib.figure", "matplotlib.patches", "matplotlib.backends.backend_agg"):  # savefig draws with Agg
        importlib.import_module(name)


def top_slices_figure(slices: Sequence[SliceResult], top_slices: Sequence[int], positive_class: str, ct_image: sitk.Image,
                      gradcam: sitk.Image, *, dpi: float = FIGURE_DPI):
    """A matplotlib Figure of the slices `top_slices` (indices on `ct_image`'s grid, in that order) side by side,
    or None when there are none: axial, lung window, patient's right on the left (the slab reoriented with
    `geometry.orient_to_lps`), the Grad-CAM heat map (`gradcam`, the CT's grid, 0..1) over it, and each slice's
    boxes labelled "rank: score". Also the DICOM Secondary Capture images and PDF (dicom_export.py)."""
    by_index = {s.index: s for s in slices}
    top = [by_index[i] for i in top_slices if i in by_index]
    if not top:
        return None
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    axis = geometry.axial_axis(ct_image)
    all_boxes = [(s.index, b.rank) for s in slices for b in s.boxes]
    colors = dict(zip(all_boxes, lesion_colors([b.score for s in slices for b in s.boxes])))
    low = LUNG_WINDOW_LEVEL - LUNG_WINDOW_WIDTH / 2

    fig = Figure(figsize=(PANEL_INCHES * len(top), PANEL_INCHES + 0.6), dpi=dpi, facecolor="black")
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=0.88, wspace=0.03)
    axes = fig.subplots(1, len(top), squeeze=False)[0]
    for n, (ax, s) in enumerate(zip(axes, top), start=1):
        ct_slab, start = _axial_slab(ct_image, axis, s.index)
        oriented = geometry.orient_to_lps(ct_slab)
        cam = geometry.orient_to_lps(_axial_slab(gradcam, axis, s.index)[0])
        aspect = oriented.GetSpacing()[1] / oriented.GetSpacing()[0]
        ax.imshow(sitk.GetArrayFromImage(oriented)[0], cmap="gray", vmin=low, vmax=low + LUNG_WINDOW_WIDTH, aspect=aspect)
        heat = np.ma.masked_less(sitk.GetArrayFromImage(cam)[0], HEAT_THRESHOLD)
        ax.imshow(heat, cmap=HEAT_COLORMAP, vmin=0, vmax=1, alpha=HEAT_OPACITY, aspect=aspect)
        for box in s.boxes:
            corners = np.array(
                [
                    geometry.original_to_oriented_index(oriented, ct_slab, np.subtract(c, start))
                    for c in (box.ijk_min, box.ijk_max)
                ]
            )
            (i0, j0, _), (i1, j1, _) = corners.min(0), corners.max(0)
            color = colors[(s.index, box.rank)]
            ax.add_patch(Rectangle((i0 - 0.5, j0 - 0.5), i1 - i0 + 1, j1 - j0 + 1, fill=False, edgecolor=color, linewidth=1.5))
            ax.text(i0 - 0.5, j0 - 0.5, f"{box.rank}: {box.score:.2f}", color=color, fontsize=8, va="bottom",
                    bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 1})
        p = s.probabilities.get(positive_class, float("nan"))
        ax.set_title(
            f"#{n}  slice {s.index}  z {s.z_mm:.1f} mm\nP({positive_class}) = {p:.2f}", color="white", fontsize=10
        )
        for x, letter in ((0.03, "R"), (0.97, "L")):
            ax.text(x, 0.5, letter, transform=ax.transAxes, color="white", fontsize=10, ha="center", va="center",
                    bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 1.5})
        ax.set_axis_off()
    return fig


def _axial_slab(image: sitk.Image, axis: int, index: int) -> tuple[sitk.Image, list[int]]:
    """The one-voxel-thick slab at `index` along `axis` (its own geometry kept) and its start voxel.

    Reorienting a slab instead of the volume keeps rendering fast on large CTs.
    """
    size, start = list(image.GetSize()), [0, 0, 0]
    size[axis], start[axis] = 1, int(index)
    return sitk.Extract(image, size, start), start


def _slices_section(result: Result) -> str:
    classes = list(result.model.classes)
    rank_of = {index: n for n, index in enumerate(result.top_slices, start=1)}
    head = "".join(f"<th>P({escape(c)})</th>" for c in classes)
    rows = []
    for s in result.slices:
        top = rank_of.get(s.index)
        probs = "".join(f'<td class="num">{s.probabilities.get(c, float("nan")):.3f}</td>' for c in classes)
        boxes = ", ".join(f"{b.rank}: {b.score:.2f}" for b in s.boxes) or "none"
        row_class = ' class="top"' if top else ""
        rows.append(
            f'<tr{row_class}><td class="num">{s.index}</td><td>{f"#{top}" if top else ""}</td>'
            f'<td class="num">{s.z_mm:.1f}</td><td class="num">{s.lung_fraction:.2f}</td>{probs}<td>{boxes}</td></tr>'
        )
    return (
        f"<h2>Analysed slices ({len(result.slices)})</h2>"
        "<table><tr><th>slice</th><th>top</th><th>z (mm)</th><th>lung fraction</th>"
        f"{head}<th>boxes (rank: score)</th></tr>{''.join(rows)}</table>"
        '<p class="muted">Slice: voxel index along the input volume\'s axis nearest to superior. '
        "z: LPS S coordinate of the slice centre. Lung fraction: lung area relative to the largest slice.</p>"
    )


def _rows(pairs: list[tuple[str, object]]) -> str:
    return "".join(f"<tr><th>{escape(k)}</th><td>{escape(_text(v))}</td></tr>" for k, v in pairs)


def _text(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _details_section(result: Result) -> str:
    i, m = result.input, result.model
    input_rows = [
        ("file", i.path or "in-memory image"),
        ("format", i.format),
        ("size (voxels, i j k)", " x ".join(str(v) for v in i.size)),
        ("spacing (mm, i j k)", i.spacing),
        ("origin (LPS mm)", i.origin),
        ("series UID", i.series_uid),
        ("notes", i.notes),
    ]
    model_rows = [
        ("name", m.name),
        ("file", m.file or "built-in untrained network"),
        ("SHA-256", m.sha256),
        ("classes", m.classes),
        ("positive class", result.positive_class),
        ("backbone", m.backbone),
        ("input size (pixels)", m.input_size),
        ("trained", "yes" if m.trained else "NO"),
        ("device", result.device),
    ]
    return (
        f"<h2>Input</h2><table>{_rows(input_rows)}</table>"
        f"<h2>Model</h2><table>{_rows(model_rows)}</table>"
    )


def _timings_section(result: Result) -> str:
    if not result.timings:
        return ""
    rows = "".join(f'<tr><td>{escape(k)}</td><td class="num">{v:.2f}</td></tr>' for k, v in result.timings.items())
    total = sum(result.timings.values())
    return (
        "<h2>Timings</h2><table><tr><th>stage</th><th>seconds</th></tr>"
        f'{rows}<tr><th>total</th><td class="num">{total:.2f}</td></tr></table>'
    )
