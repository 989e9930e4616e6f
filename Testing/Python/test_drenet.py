"""DRENet: anchors, region selection, generated image, determinism, Grad-CAM cost."""

import pytest
import torch

from CovidCTDiagnosisLib.drenet import DRENet, DRENetConfig, make_anchors
from CovidCTDiagnosisLib.inference import SliceScorer

SMALL = 128


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return DRENet(DRENetConfig(input_size=SMALL)).eval()


def test_paper_anchors_448():
    anchors = make_anchors(448)
    assert anchors.shape == (14 * 14 + 7 * 7, 4)
    first, first_big = anchors[0], anchors[14 * 14]
    assert first.tolist() == [16 - 24, 16 - 24, 16 + 24, 16 + 24]  # 48 px centred at stride/2 = 16
    assert first_big.tolist() == [32 - 48, 32 - 48, 32 + 48, 32 + 48]  # 96 px centred at 32
    assert anchors[13].tolist()[0] == 16 + 13 * 32 - 24


def test_config_validation():
    with pytest.raises(ValueError):
        DRENetConfig(classes=("a",), positive_class="a")
    with pytest.raises(ValueError):
        DRENetConfig(positive_class="flu")
    with pytest.raises(ValueError):
        DRENetConfig(input_size=100)


def test_forward_shapes_and_determinism(net):
    x = torch.rand(2, 3, SMALL, SMALL)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert a.logits.shape == (2, 2) and a.part_logits.shape == (2, 3, 2)
    assert a.region_boxes.shape == (2, 3, 4)
    assert torch.equal(a.logits, b.logits), "eval must be deterministic (dropout as a module)"
    with torch.no_grad():
        single = net(x[:1])
    assert torch.allclose(single.logits, a.logits[:1], atol=1e-5), "a slice's score must not depend on its batch"


def test_regions_best_first_and_barely_overlapping(net):
    x = torch.rand(1, 3, SMALL, SMALL)
    with torch.no_grad():
        out = net(x, proposals=5)
    scores = out.region_scores[0]
    assert torch.all(scores[:-1] >= scores[1:])
    from torchvision.ops import box_iou

    iou = box_iou(out.region_boxes[0], out.region_boxes[0])
    assert torch.all(iou[~torch.eye(5, dtype=torch.bool)] <= 0.1 + 1e-6)
    assert out.part_logits.shape == (1, 5, 2) and out.part_features.shape[1] == 3


def test_generated_image_keeps_only_weighted_regions(net):
    x = torch.ones(1, 3, 64, 64)
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0], [32.0, 32.0, 48.0, 64.0]]])
    gen = net.generate_image(x, boxes, torch.tensor([[0.75, 0.25]]))
    assert gen[0, 0, 5, 5] == 1.0  # best region at full weight
    assert gen[0, 0, 40, 40] == pytest.approx(1 / 3)  # weighted by confidence relative to the best
    assert gen[0, 0, 20, 5] == 0.0 and gen[0, 0, 63, 0] == 0.0  # the rest is zeroed


def test_gradcam_does_not_differentiate_backbone(net):
    x = torch.rand(2, 3, SMALL, SMALL)
    with torch.no_grad():
        out = net(x)
    cam = net.gradcam(out, torch.tensor([0, 1]))
    assert cam.shape == (2, SMALL // 32, SMALL // 32)
    assert float(cam.min()) >= 0 and float(cam.max()) <= 1
    assert all(p.grad is None for p in net.backbone.parameters())


def test_scorer_outputs(net):
    scorer = SliceScorer(net, "cpu")
    images = torch.rand(3, SMALL, SMALL).numpy()
    s = scorer.score(images, explain_class=0)
    assert s.probabilities.shape == (3, 2)
    assert s.probabilities.sum(1) == pytest.approx([1, 1, 1], abs=1e-5)
    assert s.box_scores.sum(1) == pytest.approx([1, 1, 1], abs=1e-5)
    assert s.cams.shape == (3, SMALL, SMALL)


def test_training_batchnorm_statistics_come_from_whole_images_only():
    torch.manual_seed(0)
    net = DRENet(DRENetConfig(input_size=64))
    reference = DRENet(DRENetConfig(input_size=64))
    reference.load_state_dict(net.state_dict())
    x = torch.rand(4, 3, 64, 64)
    net.train()(x)  # global pass, parts and generated image
    reference.train().features(x)  # the whole image alone
    for (name, a), b in zip(net.backbone.state_dict().items(), reference.backbone.state_dict().values()):
        if "running" in name:
            assert torch.allclose(a, b), name
    assert all(m.training for m in net.modules())  # the parts' pass left BatchNorm training again


def test_cuda_inference_turns_tf32_off_and_restores_it():
    from CovidCTDiagnosisLib.inference import full_float32

    before, enabled = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled
    with full_float32(torch.device("cuda")):
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.enabled == enabled  # cuDNN stays on; only its precision changes
    assert torch.backends.cudnn.allow_tf32 == before
    with full_float32(torch.device("cpu")):
        assert torch.backends.cudnn.allow_tf32 == before


def test_roi_align_and_nms_match_torchvision():
    """drenet's own RoIAlign and NMS (written to keep torchvision, and the torch._dynamo it loads, out of the
    analysis) give torchvision's results: boxes inside, across and beyond the image border, several images."""
    import torchvision.ops

    from CovidCTDiagnosisLib.drenet import nms, roi_align

    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 48)
    corner = torch.rand(40, 2) * torch.tensor([70.0, 90.0]) - 12
    boxes = torch.cat([corner, corner + torch.rand(40, 2) * 40 + 1], 1)
    rois = torch.cat([torch.randint(0, 3, (40, 1)).float(), boxes], 1)
    ours, theirs = roi_align(x, rois, 12, 2), torchvision.ops.roi_align(x, rois, 12, 1.0, 2, aligned=True)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5)
    for _ in range(10):
        scores = torch.rand(300)
        corner = torch.rand(300, 2) * 100
        boxes = torch.cat([corner, corner + torch.rand(300, 2) * 40 + 1], 1)
        for iou in (0.1, 0.5):
            assert torch.equal(nms(boxes, scores, iou), torchvision.ops.nms(boxes, scores, iou))
