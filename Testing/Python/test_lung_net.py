"""The lung network: shapes, the shipped files, lesion painting and a resumable training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from CovidCTDiagnosisLib import lung_net
from CovidCTDiagnosisLib.errors import ModelFileError
from CovidCTDiagnosisLib.training import lung_model
from CovidCTDiagnosisLib.volume_io import hu_to_u8


def test_unet_shapes():
    net = lung_model.LungUNet((4, 8, 16, 32)).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 1, lung_net.LUNG_NET_SIZE, lung_net.LUNG_NET_SIZE))
    assert out.shape == (2, 1, lung_net.LUNG_NET_SIZE, lung_net.LUNG_NET_SIZE)


def test_probability_keeps_the_slice_size():
    slices = np.zeros((3, 70, 90), np.uint8)
    prob = lung_net.lung_probability(slices)
    assert prob.shape == (3, 70, 90) and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0


def test_shipped_onnx_is_the_shipped_weights():
    """lung_net runs the ONNX export on OpenCV; it must give the trained PyTorch weights' probabilities
    (on the demo phantom's slices and on noise)."""
    from CovidCTDiagnosisLib.phantom import make_demo_phantom

    hu = sitk_array(make_demo_phantom(seed=0).image)
    slices = np.stack([lung_net.to_network_input(hu_to_u8(s)) for s in hu[:: max(1, len(hu) // 12)]])
    slices = np.concatenate([slices, np.random.default_rng(0).random((2,) + slices.shape[1:], np.float32)])
    with torch.inference_mode():
        expected = torch.sigmoid(lung_model.load_lung_unet()(torch.from_numpy(slices)[:, None]))[:, 0].numpy()
    got = lung_net._probability_small(slices)
    assert np.abs(got - expected).max() < 1e-4
    assert ((got > 0.5) == (expected > 0.5)).mean() > 0.9999 and (expected > 0.5).any()


def sitk_array(image):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).astype(np.float32)


def test_hu_window():
    assert list(hu_to_u8(np.array([-1450.0, -700.0, 50.0, 3000.0]))) == [0, 128, 255, 255]


def test_painted_lesions_stay_in_the_lung():
    rng = np.random.default_rng(0)
    gray = np.full((64, 64), 40, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:54, 8:28] = mask[10:54, 36:56] = 1
    changed = False
    for _ in range(5):
        painted = lung_model.paint_lesions(rng, gray, mask)
        outside = cv2_dilate(mask) == 0  # the lesion edge is soft: a Gaussian of sigma <= 2 px
        assert np.array_equal(painted[outside], gray[outside])
        changed |= bool((painted[mask > 0] != 40).any())
    assert changed


def test_soft_tissue_window_rendering():
    """A lung-window slice re-windowed to the mediastinal window (level 40, width 400): lung black, soft tissue grey."""
    hu = np.array([-1000.0, -850.0, -500.0, -160.0, 40.0])  # air, lung, ground glass, the window's bottom, muscle
    shown = lung_model._soft_tissue_window(hu_to_u8(hu))
    assert list(shown[:4]) == [0, 0, 0, 0]
    assert abs(int(shown[4]) - 127) <= 4  # (40 + 160) / 400 of 255, within the lung window's 8-bit steps


def cv2_dilate(mask):
    import cv2

    return cv2.dilate(mask, np.ones((15, 15), np.uint8))


def test_training_writes_a_loadable_model_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    base = []
    for _ in range(4):
        gray = rng.integers(0, 60, (lung_model.BASE_SIZE,) * 2).astype(np.uint8) + 180
        mask = np.zeros_like(gray)
        mask[60:200, 30:120] = mask[60:200, 136:226] = 1
        gray[mask > 0] = 20
        base.append((gray, mask))
    out = tmp_path / "lungs.pt"
    lung_model.train(base, out, iterations=2, batch=2, log=lambda m: None)
    state = torch.load(out.with_suffix(".state"), weights_only=False)
    assert state["step"] == 2
    net = lung_model.load_lung_unet(out)
    assert isinstance(net, lung_model.LungUNet) and not net.training
    onnx = lung_net.load_lung_net(str(out.with_suffix(".onnx")))  # the export beside the weights runs on OpenCV
    onnx.setInput(np.zeros((3, 1, lung_net.LUNG_NET_SIZE, lung_net.LUNG_NET_SIZE), np.float32))
    assert onnx.forward().shape == (3, 1, lung_net.LUNG_NET_SIZE, lung_net.LUNG_NET_SIZE)
    lung_model.train(base, out, iterations=2, batch=2, log=lambda m: None)  # finished: nothing left to train
    assert torch.load(out.with_suffix(".state"), weights_only=False)["step"] == 2
    with pytest.raises(ValueError, match="run of 2 iterations"):
        lung_model.train(base, out, iterations=5, batch=2, log=lambda m: None)


def test_average_of_lung_networks(tmp_path):
    """`--average`: the parameters and batch-norm statistics are the mean of the files', written with the ONNX export."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = lung_model.LungUNet((4, 8, 16, 32))  # the channels travel with the file
        net.stem[1].running_mean.fill_(seed)  # batch-norm statistics differ too
        paths.append(lung_model._save(net.eval(), tmp_path / f"stage{seed}.pt", iterations=1, seed=seed, init=None))
    out = tmp_path / "averaged.pt"
    assert lung_model.main(["--out", str(out), "--average", *map(str, paths)]) == 0
    a, b, mean = (lung_model.load_lung_unet(p).state_dict() for p in (*paths, out))
    for key in ("stem.0.weight", "head.2.bias", "stem.1.running_mean"):
        assert torch.allclose(mean[key], (a[key] + b[key]) / 2)
    assert torch.load(out, weights_only=True)["averaged"] == ["stage0.pt", "stage1.pt"]
    onnx = lung_net.load_lung_net(str(out.with_suffix(".onnx")))
    x = np.random.default_rng(0).random((1, 1, lung_net.LUNG_NET_SIZE, lung_net.LUNG_NET_SIZE), np.float32)
    onnx.setInput(x)
    with torch.inference_mode():
        expected = lung_model.load_lung_unet(out)(torch.from_numpy(x)).numpy()
    assert np.abs(onnx.forward() - expected).max() < 1e-3
    with pytest.raises(SystemExit):
        lung_model.main(["--out", str(out)])  # training needs --data


def test_not_a_lung_model_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, path)
    with pytest.raises(ValueError, match="not a covidct-lung-unet"):
        lung_model.load_lung_unet(path)
    with pytest.raises(ModelFileError, match="not a readable ONNX lung network .*; reinstall the package"):
        lung_net.load_lung_net(str(path))  # a damaged installation: exit 6, one line
