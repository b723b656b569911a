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


def _pools_by_autograd(x: torch.Tensor, valid: torch.Tensor):
    """The masked average and max pooling as plain autograd ops (QD-ATT's before _MaskedPools)."""
    keep = valid.to(x.dtype)
    avg = torch.bmm(keep.unsqueeze(1), x).squeeze(1) / keep.sum(1, keepdim=True).clamp_min(1)
    peak = x.masked_fill(~valid.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)
    return avg, peak


def test_masked_pools_are_autograds_with_ties_and_padding():
    from refvg.models.qrnet import _MaskedPools

    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 12, 5, generator=g)
    x[0, 2:6] = 5.0  # a flat region: tied maxima share the gradient evenly
    x[1, 9:] = 9.0  # the largest values lie on padding: not the max, no gradient
    x[3, 4, 2] = torch.finfo(x.dtype).min  # a real pixel at the float minimum, as padding's fill
    valid = torch.ones(4, 12, dtype=torch.bool)
    valid[1, 9:] = False
    valid[2] = False  # all padding
    weights = torch.randn(2, 4, 5, generator=g)
    results = []
    for pool in (
        lambda t: _MaskedPools.apply(t.transpose(1, 2).unflatten(2, (3, 4)), valid),
        lambda t: _pools_by_autograd(t, valid),
    ):
        t = x.clone().requires_grad_()
        avg, peak = pool(t)
        ((avg * weights[0]).sum() + (peak * weights[1]).sum()).backward()
        results.append((avg, peak, t.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
    assert results[0][2][0, 2:6].ne(0).all()
    assert results[0][2][1, 9:].eq(0).all() and results[0][2][2].eq(0).all()


def _qd_att_by_autograd(att, fmap, query, valid):
    """QD-ATT as plain autograd ops (the code before _MaskedPools and _GateMap)."""
    x = fmap.flatten(2).transpose(1, 2)
    avg, peak = _pools_by_autograd(x, valid)
    channel = att.channel_gate(avg, peak, query)
    weight, bias = att.spatial.weight_and_bias(query)
    spatial = torch.sigmoid(torch.bmm(x, channel.unsqueeze(-1) * weight).squeeze(-1) + bias)
    b, c, h, w = fmap.shape
    return fmap * channel.view(b, c, 1, 1) * spatial.view(b, 1, h, w)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_qd_att_autograd_nodes_compute_what_autograd_computed(memory_format):
    """Outputs, the map's and every parameter's gradients, in float64 (float32 only reorders sums):
    the fused nodes change the cost, not the maths."""
    from refvg.models.qrnet import QueryDynamicAttention

    torch.manual_seed(0)
    att = QueryDynamicAttention(channels=16, query_dim=8, rank=4, reduction=4).double()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in att.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    fmap = torch.randn(3, 16, 5, 6, generator=g, dtype=torch.float64)
    fmap = fmap.contiguous(memory_format=memory_format)
    query = torch.randn(3, 8, generator=g, dtype=torch.float64)
    valid = torch.ones(3, 5, 6, dtype=torch.bool)
    valid[0, :, 4:] = valid[1, 3:] = False
    valid = valid.flatten(1)
    upstream = torch.randn(3, 16, 5, 6, generator=g, dtype=torch.float64)
    results = []
    for run in (att, lambda *a: _qd_att_by_autograd(att, *a)):
        att.zero_grad()
        t = fmap.clone().requires_grad_()
        out = run(t, query, valid)
        out.backward(upstream)
        results.append([out, t.grad] + [p.grad.clone() for p in att.parameters()])
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


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
