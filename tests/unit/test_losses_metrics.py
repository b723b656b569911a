import numpy as np
import pytest
import torch

from refvg.losses import box_l1_loss, giou_loss, grounding_box_loss
from refvg.metrics import accuracy_at_iou, box_iou, generalized_box_iou, summarize_box_metrics

A = [0.0, 0.0, 2.0, 2.0]


@pytest.mark.parametrize("as_tensor", [True, False])
def test_iou_and_giou_hand_values(as_tensor):
    a = [A, A, A]
    b = [
        A,  # identical
        [3.0, 0.0, 4.0, 1.0],  # disjoint: union 5, enclosing [0,0,4,2] = 8
        [1.0, 1.0, 3.0, 3.0],  # overlap 1x1: union 7, enclosing [0,0,3,3] = 9
    ]
    conv = (lambda x: torch.tensor(x, dtype=torch.float64)) if as_tensor else np.array
    iou = box_iou(conv(a), conv(b))
    giou = generalized_box_iou(conv(a), conv(b))
    assert isinstance(iou, torch.Tensor) == as_tensor
    np.testing.assert_allclose(np.asarray(iou), [1.0, 0.0, 1 / 7], atol=1e-9)
    np.testing.assert_allclose(
        np.asarray(giou), [1.0, 0.0 - (8 - 5) / 8, 1 / 7 - (9 - 7) / 9], atol=1e-9
    )


def test_degenerate_boxes_do_not_give_nan():
    z = torch.zeros(1, 4)
    assert box_iou(z, z).item() == 0.0
    assert torch.isfinite(generalized_box_iou(z, z)).all()


def test_accuracy_at_iou_hand_example():
    ious = np.array([0.2, 0.5, 0.74, 0.9])
    acc = accuracy_at_iou(ious, (0.5, 0.75, 0.95))
    assert acc == {0.5: 0.75, 0.75: 0.25, 0.95: 0.0}
    s = summarize_box_metrics(torch.tensor(ious))
    assert s["acc@0.5"] == 0.75 and s["n"] == 4
    assert s["mean_iou"] == pytest.approx(ious.mean())
    # passes: 0.5:3, 0.55..0.7:2 each (4 thresholds), 0.75..0.9: 1 each (4), 0.95: 0
    assert s["acc@0.5:0.95"] == pytest.approx((3 + 2 * 4 + 1 * 4) / 4 / 10)
    assert s["acc@0.55"] == 0.5
    assert summarize_box_metrics([])["n"] == 0


def test_losses_zero_for_identical_and_positive_otherwise():
    t = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    out = grounding_box_loss(t, t, 5.0, 2.0)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)
    p = t + torch.tensor([0.05, 0.0, 0.0, 0.0])
    assert box_l1_loss(p, t).item() == pytest.approx(
        0.05, abs=1e-6
    )  # summed over coords, mean over boxes
    assert giou_loss(p, t).item() > 0
    out = grounding_box_loss(p, t, 5.0, 2.0)
    assert out["loss"].item() == pytest.approx(5 * out["l1"].item() + 2 * out["giou"].item())


def test_giou_loss_has_gradient_for_disjoint_boxes():
    p = torch.tensor([[0.2, 0.2, 0.1, 0.1]], requires_grad=True)
    t = torch.tensor([[0.8, 0.8, 0.1, 0.1]])
    giou_loss(p, t).backward()
    assert p.grad.abs().sum() > 0


def test_mask_metrics_hand_example():
    from refvg.metrics import mask_intersection_union, summarize_mask_metrics

    a = np.zeros((4, 4), bool)
    a[0:2, 0:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3, 1:3] = True
    assert mask_intersection_union(a, b) == (1, 7)  # overlap 1 pixel, union 4 + 4 - 1
    # Three samples: IoU 1/7, 6/6, 4/5.
    s = summarize_mask_metrics([1, 6, 4], [7, 6, 5])
    assert s["oIoU"] == pytest.approx(11 / 18)  # cumulative: (1 + 6 + 4) / (7 + 6 + 5)
    assert s["mIoU"] == pytest.approx((1 / 7 + 1 + 0.8) / 3)
    assert [s[f"prec@{t}"] for t in (0.5, 0.6, 0.7, 0.8, 0.9)] == [
        2 / 3,
        2 / 3,
        2 / 3,
        2 / 3,
        1 / 3,
    ]
    assert s["n"] == 3
    # oIoU weighs big objects more: one perfect big mask and one missed small one.
    s = summarize_mask_metrics([100, 0], [100, 10])
    assert s["oIoU"] == pytest.approx(100 / 110) and s["mIoU"] == pytest.approx(0.5)
    assert summarize_mask_metrics([0], [0])["mIoU"] == 0.0  # nothing predicted, nothing to find
    assert summarize_mask_metrics([], [])["n"] == 0
    with pytest.raises(ValueError, match="shapes differ"):
        mask_intersection_union(a, b[:3])
    with pytest.raises(ValueError, match="larger than its union"):
        summarize_mask_metrics([5], [4])


def test_mask_scored_at_original_resolution():
    """Logits over the letterboxed square come back to the original image: padding cropped,
    resized."""
    from refvg.data.transforms import Letterbox
    from refvg.metrics import mask_intersection_union

    lb = Letterbox(
        8, 4, 4
    )  # 8x4 image -> 4x2 content in a 4x4 square (scale 0.5), rows 2-3 are padding
    logits = -torch.ones(4, 4)
    logits[0, 1] = 1.0  # one square pixel = original rows 0-1, cols 2-3
    logits[2:, :] = 5.0  # confident nonsense on the padding must not leak into the image
    pred = (lb.mask_from_square(logits) > 0).numpy()
    assert pred.shape == (4, 8)
    expected = np.zeros((4, 8), bool)
    expected[0:2, 2:4] = True
    np.testing.assert_array_equal(pred, expected)
    gt = np.zeros((4, 8), bool)
    gt[0:2, 3:6] = True  # 6 pixels, 2 shared with the prediction
    assert mask_intersection_union(pred, gt) == (2, 8)
    # A lower-resolution prediction (2x2 over the square) is first brought to the square's size.
    assert lb.mask_from_square(torch.ones(2, 2)).shape == (4, 8)


def test_mask_loss_ignores_padding_and_rewards_the_right_mask():
    from refvg.losses import mask_loss

    target = torch.zeros(2, 8, 8)
    target[:, 2:5, 2:5] = 1
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[:, :, 6:] = False
    good = (target * 2 - 1) * 10
    bad = -good
    out = mask_loss(good, target, valid, 1.0, 1.0)
    assert out["bce"] < 1e-3 and out["dice"] < 1e-3
    assert out["loss"] == pytest.approx(out["bce"].item() + out["dice"].item())
    assert mask_loss(bad, target, valid, 1.0, 1.0)["loss"] > 5
    noisy_padding = good.clone()
    noisy_padding[:, :, 6:] = 10.0  # wrong, but on padding only
    assert torch.allclose(
        mask_loss(noisy_padding, target, valid, 1.0, 0.5)["loss"],
        mask_loss(good, target, valid, 1.0, 0.5)["loss"],
    )
    logits = torch.zeros(2, 8, 8, requires_grad=True)
    mask_loss(logits, target, valid, 1.0, 1.0)["loss"].backward()
    assert logits.grad[:, :, :6].abs().sum() > 0 and logits.grad[:, :, 6:].abs().sum() == 0
