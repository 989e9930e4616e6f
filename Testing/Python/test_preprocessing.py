import numpy as np
import pytest

from CovidCTDiagnosisLib.preprocessing import lung_window, prepare_slice, square_lung_box


def test_lung_window():
    hu = np.array([-2000, -1450, -700, 50, 1000])
    assert lung_window(hu, -700, 1500).tolist() == pytest.approx([0, 0, 0.5, 1, 1])


def test_crop_maps_back_to_the_slice():
    hu = np.full((100, 120), -1000.0)
    mask = np.zeros((100, 120), bool)
    mask[20:60, 30:90] = True
    hu[mask] = -850
    hu[40, 70] = 0  # a bright dot inside the lung
    image, crop = prepare_slice(hu, mask, 64, -700, 1500)
    assert image.shape == (64, 64) and image.dtype == np.float32
    y, x = np.unravel_index(np.argmax(image), image.shape)
    i, j = crop.to_slice(x, y)
    assert abs(i - 70) <= 1 and abs(j - 40) <= 1
    x0, y0, side = square_lung_box(mask)
    assert side >= 60 and x0 <= 30 and y0 <= 20
    assert image[0, 0] == 0  # outside the lungs is zeroed
