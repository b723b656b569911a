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
    np.testing.assert_allclose(np.asarray(giou), [1.0, 0.0 - (8 - 5) / 8, 1 / 7 - (9 - 7) / 9], atol=1e-9)


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
    assert box_l1_loss(p, t).item() == pytest.approx(0.05, abs=1e-6)  # summed over coords, mean over boxes
    assert giou_loss(p, t).item() > 0
    out = grounding_box_loss(p, t, 5.0, 2.0)
    assert out["loss"].item() == pytest.approx(5 * out["l1"].item() + 2 * out["giou"].item())


def test_giou_loss_has_gradient_for_disjoint_boxes():
    p = torch.tensor([[0.2, 0.2, 0.1, 0.1]], requires_grad=True)
    t = torch.tensor([[0.8, 0.8, 0.1, 0.1]])
    giou_loss(p, t).backward()
    assert p.grad.abs().sum() > 0
