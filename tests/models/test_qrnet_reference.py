"""QRNet computes what it computed before its hot paths were rewritten for speed (QD-ATT gates on
strided views, Swin maps as channels-last views of the tokens): outputs, loss and every parameter's
gradient, for the same weights and input, against a reference stored from the earlier code
(tests/data/qrnet_reference.pt), and the state dict keeps its keys and shapes (so checkpoints and
`from_pretrained` Swin weights still load).

Regenerate the reference (only for an intended change of the model's math) from the code to compare
against:  PYTHONPATH=<that checkout> python tests/models/test_qrnet_reference.py --write
"""

import sys
from pathlib import Path

import pytest
import torch

from refvg.config import Config
from refvg.models import build_model
from tests.helpers import as_trained

REFERENCE = Path(__file__).parent / "data" / "qrnet_reference.pt"
VOCAB, PAD = 200, 0
# The default pipeline's qrnet (Swin, stages at strides 4 and 8) and the ResNet backbone, small.
CASES = {
    "swin": {"kind": "swin", "out_stages": [0, 1], "embed_dim": 16},
    "resnet": {"kind": "resnet", "out_stages": [1, 2], "hidden_sizes": [16, 32, 64]},
}
PROJECTIONS = 2


def build(case: str):
    cfg = Config.model_validate(
        {
            "model": {
                "visual": CASES[case],
                "text": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64},
                "fusion": {"d_model": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64},
            }
        }
    )
    torch.manual_seed(0)
    model = build_model("qrnet", cfg, VOCAB, PAD).train()
    # Weights from the parameters' names and shapes, not from the modules' init order: a refactor
    # that builds the modules in another order still gets these weights. The dynamic layers' V start
    # at zero (every gate 0.5 whatever the input); random values here make the gates depend on the
    # map and the sentence.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1
            p.copy_(
                torch.randn(p.shape, generator=g) * scale
                + (1.0 if name.endswith("norm.weight") else 0.0)
            )
    return model


def make_batch(b: int = 4, size: int = 64, length: int = 10) -> dict:
    g = torch.Generator().manual_seed(1)
    pixel_mask = torch.zeros(b, size, size, dtype=torch.bool)
    pixel_mask[0, :, 48:] = True  # letterbox padding: right, bottom, none, both
    pixel_mask[1, 40:, :] = True
    pixel_mask[3, 52:, :] = pixel_mask[3, :, 36:] = True
    attention_mask = torch.ones(b, length, dtype=torch.long)
    attention_mask[:, 6:] = 0
    return {
        "image": torch.randn(b, 3, size, size, generator=g),
        "pixel_mask": pixel_mask,
        "input_ids": torch.randint(1, VOCAB, (b, length), generator=g) * attention_mask,
        "attention_mask": attention_mask,
        "box": torch.cat(
            [0.3 + 0.4 * torch.rand(b, 2, generator=g), 0.1 + 0.3 * torch.rand(b, 2, generator=g)],
            1,
        ),
    }


def summary(case: str) -> dict:
    """Outputs, loss, and per parameter its gradient's norm and projections on seeded random
    directions (a few numbers that move when any entry of the gradient moves)."""
    model, batch = build(case), make_batch()
    out = model(batch)
    loss = model.compute_loss(out, batch)["loss"]
    loss.backward()
    g = torch.Generator().manual_seed(2)
    grads = {}
    for name, p in sorted(model.named_parameters()):
        d = torch.randn(PROJECTIONS, p.numel(), generator=g, dtype=torch.float64)
        flat = p.grad.reshape(-1).double()
        grads[name] = torch.cat([flat.norm().view(1), d @ flat])
    return {
        "pred_boxes": out.pred_boxes.detach(),
        "loss": loss.detach(),
        "grads": grads,
        "state": {k: tuple(v.shape) for k, v in model.state_dict().items()},
    }


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE, weights_only=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_qrnet_outputs_and_gradients_match_the_reference(case, reference):
    ref, now = reference[case], summary(case)
    assert now["state"] == ref["state"]  # same parameter and buffer names and shapes
    torch.testing.assert_close(now["pred_boxes"], ref["pred_boxes"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(now["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    assert now["grads"].keys() == ref["grads"].keys()
    for name, summ in now["grads"].items():
        # float32 sums in another order: relative to the gradient's norm
        torch.testing.assert_close(
            summ,
            ref["grads"][name],
            rtol=1e-4,
            atol=1e-5 * float(ref["grads"][name][0]) + 1e-9,
            msg=lambda m, name=name: f"{case} {name}: {m}",
        )


def test_qd_att_gates_do_not_depend_on_the_memory_format():
    from refvg.models.qrnet import QueryDynamicAttention

    torch.manual_seed(0)
    att = as_trained(QueryDynamicAttention(channels=32, query_dim=16, rank=4, reduction=4))
    fmap, query = torch.randn(3, 32, 6, 5), torch.randn(3, 16)
    valid = torch.rand(3, 30, generator=torch.Generator().manual_seed(3)) > 0.3
    last = fmap.contiguous(memory_format=torch.channels_last)
    for a, b in zip(att.gates(fmap, query, valid), att.gates(last, query, valid)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(att(fmap, query, valid), att(last, query, valid))


def test_masked_max_pooling_gradient_is_amaxs_with_ties_and_padding():
    from refvg.models.qrnet import _MaskedAmax

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 12, 5, generator=g)
    x[0, 2:6] = 5.0  # a flat region: tied maxima share the gradient evenly
    x[1, 9:] = 9.0  # the largest values lie on padding: not the max, no gradient
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, 9:] = False
    valid[2] = False  # all padding
    weight = torch.randn(3, 5, generator=g)
    grads = []
    for pool in (
        lambda t: _MaskedAmax.apply(t, valid),
        lambda t: t.masked_fill(~valid.unsqueeze(-1), torch.finfo(t.dtype).min).amax(1),
    ):
        t = x.clone().requires_grad_()
        out = pool(t)
        (out * weight).sum().backward()
        grads.append((out, t.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert grads[0][1][0, 2:6].ne(0).all()


@pytest.mark.parametrize("size", [(6, 6), (7, 5), (5, 8)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_avg_down_is_zero_padded_2x2_average_pooling(size, memory_format):
    import torch.nn.functional as F

    from refvg.models.qrnet import avg_down

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, *size, generator=g)
    weight = torch.randn(2, 8, (size[0] + 1) // 2, (size[1] + 1) // 2, generator=g)
    a = x.clone().contiguous(memory_format=memory_format).requires_grad_()
    b = x.clone().requires_grad_()
    out = avg_down(a)
    ref = F.avg_pool2d(F.pad(b, (0, size[1] % 2, 0, size[0] % 2)), 2)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, b.grad)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    REFERENCE.parent.mkdir(exist_ok=True)
    torch.save({case: summary(case) for case in CASES}, REFERENCE)
    print(f"wrote {REFERENCE}")
