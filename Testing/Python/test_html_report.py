"""report.html: self-contained, honest about untrained networks, drawn in radiological convention."""

import base64
import io
import re
from html import escape

import numpy as np
import pytest
import SimpleITK as sitk
from helpers_results import FLIPPED, IDENTITY, make_result
from matplotlib.image import imread

from CovidCTDiagnosisLib.html_report import render_html
from CovidCTDiagnosisLib.result import RESEARCH_USE_ONLY, UNTRAINED_WARNING, LesionBox

PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def trained_page():
    result, ct = make_result()
    return result, render_html(result, ct)


def _png(page):
    (data,) = PNG.findall(page)
    raw = base64.b64decode(data)
    assert raw.startswith(b"\x89PNG")
    return imread(io.BytesIO(raw))


def test_trained_page_content(trained_page):
    result, page = trained_page
    assert page.count(RESEARCH_USE_ONLY) >= 1
    assert f'<p class="verdict">{result.patient.label}</p>' in page
    for name in result.model.classes:
        assert name in page
    assert "mean of the analysed slices" in page
    assert result.model.sha256 in page and "cpu" in page
    assert "UNTRAINED" not in page
    for s in result.slices:
        assert f'<td class="num">{s.index}</td>' in page
    assert "network" in page and "1.50" in page  # timings


def test_self_contained(trained_page):
    _, page = trained_page
    assert "http" not in page.lower()
    assert not re.search(r"<(script|link|iframe)\b", page)
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert _png(page).shape[1] > _png(page).shape[0]  # three panels side by side


def test_the_models_validated_figures_stand_beside_the_label(trained_page, tmp_path):
    from dataclasses import replace

    from CovidCTDiagnosisLib.performance import NO_FIGURES, validated_performance

    result, page = trained_page
    trust = page[page.index('<p class="verdict">'):page.index("<table>", page.index('<p class="verdict">'))]
    assert NO_FIGURES in trust  # the hand-made model records none
    test = {"patient_level_mean": {"auc": 0.794, "n": 115}, "image_level": {"auc": 0.779, "n": 216}, "ece_image_level": 0.077}
    figures = validated_performance({"data": ["/d/ucsd-covid-ct/labels.csv"], "test": test})
    (tmp_path / "MODEL_CARD.md").write_text("# card")
    model = replace(result.model, performance=figures, file=str(tmp_path / "m.pt"))
    page = render_html(replace(result, model=model), make_result()[1])
    trust = page[page.index('<p class="verdict">'):page.index("<table>", page.index('<p class="verdict">'))]
    assert "115 held-out patients (216 images) of ucsd-covid-ct" in trust and "patient AUC 0.794" in trust
    assert "BELOW the target of 0.90" in trust and "image AUC 0.779" in trust and "(ECE) 0.077" in trust
    assert str(tmp_path / "MODEL_CARD.md") in trust
    figures = validated_performance({"test": {**test, "patient_level_mean": {"auc": 0.95, "n": 115}}})
    assert "meets the target" in render_html(replace(result, model=replace(model, performance=figures)), make_result()[1])


def test_untrained_banner_and_no_verdict():
    result, ct = make_result(trained=False)
    page = render_html(result, ct)
    assert f'<div class="untrained">{escape(UNTRAINED_WARNING)}</div>' in page
    assert 'class="verdict"' not in page
    assert "No result: the network is untrained." in page
    assert page.count(escape(UNTRAINED_WARNING)) == 1  # the warning is the banner, not repeated in the list
    assert RESEARCH_USE_ONLY in page


def test_text_is_escaped():
    result, ct = make_result()
    result.warnings = ["<script>alert(1)</script>"]
    page = render_html(result, ct)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_no_top_slices_no_figure():
    result, ct = make_result()
    result.top_slices = []
    page = render_html(result, ct)
    assert "data:image" not in page and "<table>" in page


def _same_anatomy_on_a_flipped_grid(result, ct):
    """The same physical volume and boxes stored with i and j reversed (as a RAS-ordered file would)."""
    ni, nj, _ = ct.GetSize()

    def flip(image):
        out = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, ::-1, ::-1].copy())
        out.SetSpacing(image.GetSpacing())
        out.SetDirection(FLIPPED)
        out.SetOrigin(image.TransformIndexToPhysicalPoint((ni - 1, nj - 1, 0)))
        return out

    for s in result.slices:
        s.boxes = [
            LesionBox(
                b.rank,
                b.score,
                (ni - 1 - b.ijk_max[0], nj - 1 - b.ijk_max[1], b.ijk_min[2]),
                (ni - 1 - b.ijk_min[0], nj - 1 - b.ijk_min[1], b.ijk_max[2]),
                b.center_lps,
                b.size_mm,
            )
            for b in s.boxes
        ]
    result.gradcam, result.lung_labels = flip(result.gradcam), flip(result.lung_labels)
    return result, flip(ct)


def test_figure_is_in_radiological_convention_whatever_the_storage_order(trained_page):
    """The same anatomy stored LPS-ordered or RAS-ordered gives the same picture, boxes included."""
    _, page = trained_page
    flipped_result, flipped_ct = _same_anatomy_on_a_flipped_grid(*make_result(IDENTITY))
    np.testing.assert_array_equal(_png(render_html(flipped_result, flipped_ct)), _png(page))


def test_figure_shows_the_boxes(trained_page):
    """Rendering without boxes changes the picture (the boxes are drawn)."""
    result, ct = make_result()
    for s in result.slices:
        s.boxes = []
    assert not np.array_equal(_png(render_html(result, ct)), _png(trained_page[1]))
