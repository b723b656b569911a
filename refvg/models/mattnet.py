"""MAttNet-style candidate ranking (Yu et al., CVPR 2018) trained with CM-Erase (Liu et al., CVPR
2019, "Improving Referring Expression Grounding With Cross-Modal Attention-Guided Erasing"), with
CM-Erase's attention-based location and relation modules (its official code, xh-liu/CM-Erase-REG).

The model scores each candidate box of the image (ground-truth objects or a detector's boxes, see
refvg.data.proposals) against the expression and outputs the best one's box:
- language attention: three word attentions over the expression give a subject, a location and a
  relation phrase embedding, and a softmax over three gives the modules' weights;
- subject module: the candidate's region of the backbone map pooled by RoI align (:func:`roi_align`,
  bilinear sampling with `grid_sample`) into roi_size x roi_size cells, a phrase-guided spatial
  attention over the cells, plus the region's mean colour (and, with `category_input: embedding`, a
  category embedding);
- location module: an attention, guided by the location phrase, over the candidate's normalised
  geometry [x0, y0, x1, y1, area] and its offsets to up to `neighbours` nearest candidates
  (same-category ones only when `category_input` is not none, as MAttNet);
- relation module: an attention, guided by the relation phrase, over up to `max_contexts` nearest
  other candidates as context objects (their pooled feature, colour and offset);
- score = sum over modules of weight x cosine(module feature, phrase). Loss: cross-entropy over the
  valid candidates (a sample whose target is not among them adds none) + a hinge ranking loss
  against a mismatched expression and a mismatched image of the batch.

Candidate categories (`category_input`) are off by default: on RefShapes the category is the
expression's noun, so they would hand the model the answer for many expressions.

CM-Erase (training only, the `erase` section of its config), from the model's own attention on the
sample, as the official code: a language copy with one word replaced by [MASK], drawn from the
module-weighted word attention, and a visual copy in which a module is drawn from the module weights
and then, for every candidate, one of that module's items drawn from its attention is zeroed: a
window of subject cells, a location item (its own geometry or a neighbour's offset) or a context
object. Each copy is trained on with the cross-entropy and the paper's hinge term (language copy:
against a mismatched image; visual copy: against a mismatched expression), so the model learns
complementary evidence instead of one dominant cue. `rule: argmax` erases the most attended item
instead of drawing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from refvg.data.transforms import cxcywh_to_xyxy
from refvg.models.base import GroundingModel, GroundingOutput
from refvg.models.registry import register_model
from refvg.models.mattnet_config import MAttNetConfig

MODULES = ("subject", "location", "relation")
FAR = -1e4  # the logit of a padding candidate (not -inf: a row of them must stay finite)


# -------------------------------------------------------------------------------------------
# geometry


def roi_align(
    fmap: torch.Tensor, boxes_xyxy: torch.Tensor, size: int, samples: int = 2
) -> torch.Tensor:
    """RoI align: fmap [B,C,H,W] covering [0,1]^2, boxes [B,K,4] xyxy in that frame ->
    [B,K,C,size,size]. Each bin averages samples x samples bilinear samples at the centres of its
    sub-bins (as torchvision's RoIAlign with aligned=True); a map value sits at its pixel centre ((j
    + 0.5) / W)."""
    b, c, _, _ = fmap.shape
    k = boxes_xyxy.shape[1]
    n = size * samples
    t = (
        torch.arange(n, device=fmap.device, dtype=fmap.dtype) + 0.5
    ) / n  # sub-bin centres in the box
    x0, y0, x1, y1 = boxes_xyxy.to(fmap.dtype).unbind(-1)  # [B,K]
    xs = x0[..., None] + t * (x1 - x0)[..., None]  # [B,K,n]
    ys = y0[..., None] + t * (y1 - y0)[..., None]
    grid = torch.stack(
        torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), -1
    )  # [B,K,n(y),n(x),2]
    grid = grid.reshape(b, k * n, n, 2) * 2 - 1  # grid_sample: -1/+1 are the map's outer edges
    out = F.grid_sample(
        fmap, grid, mode="bilinear", padding_mode="border", align_corners=False
    )  # [B,C,K*n,n]
    out = out.view(b, c, k, size, samples, size, samples).mean((4, 6))
    return out.permute(0, 2, 1, 3, 4)


def pair_offsets(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """[B,K,K,5]: candidate j relative to candidate i, MAttNet's offset [(x0_j - cx_i) / w_i, (y0_j
    - cy_i) / h_i, (x1_j - cx_i) / w_i, (y1_j - cy_i) / h_i, area_j / area_i]."""
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    w, h = (x1 - x0).clamp_min(1e-3), (y1 - y0).clamp_min(1e-3)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rel = [
        (x0[:, None, :] - cx[..., None]) / w[..., None],
        (y0[:, None, :] - cy[..., None]) / h[..., None],
        (x1[:, None, :] - cx[..., None]) / w[..., None],
        (y1[:, None, :] - cy[..., None]) / h[..., None],
        (w * h)[:, None, :] / (w * h)[..., None],
    ]
    return torch.stack(rel, -1)


def nearest_others(
    boxes_xyxy: torch.Tensor, allowed: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each candidate, the indices [B,K,n] of its n nearest (centre distance) others where
    `allowed` [B,K,K] is True, and which of those slots are real [B,K,n] (False: fewer than n
    allowed)."""
    k = boxes_xyxy.shape[1]
    centre = (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:]) / 2
    dist = torch.cdist(centre.float(), centre.float())
    allowed = allowed & ~torch.eye(k, dtype=torch.bool, device=allowed.device)
    dist = dist.masked_fill(~allowed, math.inf)
    m = min(n, max(k - 1, 1))
    d, idx = dist.topk(m, dim=-1, largest=False)
    real = torch.isfinite(d)
    if m < n:  # fewer candidates than slots: pad with empty slots
        idx = F.pad(idx, (0, n - m))
        real = F.pad(real, (0, n - m))
    return idx, real


def _gather_pairs(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B,K,K,D] (pair i, j), idx [B,K,n] -> [B,K,n,D]: x[b, i, idx[b, i, s]]."""
    return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


def _gather_objects(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B,K,D] (per candidate), idx [B,K,n] -> [B,K,n,D]: x[b, idx[b, i, s]]."""
    b, k, n = idx.shape
    return x.gather(1, idx.reshape(b, k * n, 1).expand(-1, -1, x.shape[-1])).view(b, k, n, -1)


# ------------------------------------------------------------------------------------------- losses


def candidate_cross_entropy(
    logits: torch.Tensor, valid: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the target over the valid candidates; samples whose target is not among the
    candidates (target -1) add nothing (0 when none has one)."""
    has = target >= 0
    if not has.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[has].masked_fill(~valid[has], FAR), target[has])


def ranking_loss(
    pos: torch.Tensor,
    neg_expression: Optional[torch.Tensor],
    neg_image: Optional[torch.Tensor],
    keep: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """MAttNet's hinge ranking loss, averaged over the samples `keep` marks:
    max(0, margin - S(o_i, r_i) + S(o_i, r_j)) + max(0, margin - S(o_i, r_i) + S(o_k, r_i)),
    with r_j a mismatched expression and o_k an object of a mismatched image (a None negative: no
    such term, as CM-Erase's erased copies have one each)."""
    if not keep.any():
        return pos.sum() * 0.0
    loss = pos.new_zeros(int(keep.sum()))
    for neg in (neg_expression, neg_image):
        if neg is not None:
            loss = loss + F.relu(margin - pos[keep] + neg[keep])
    return loss.mean()


# -------------------------------------------------------------------------------------------
# erasing


def choose(weights: torch.Tensor, rule: str = "sample") -> tuple[torch.Tensor, torch.Tensor]:
    """One index per row of `weights` [..., N] (>= 0): a multinomial draw in proportion to the row
    (CM-Erase's `torch.multinomial` over the attention) or, with rule "argmax", its largest; and
    whether the row has any weight [...] (an all-zero row has nothing to choose; its index is 0). A
    zero-weight item is never drawn."""
    shape, n = weights.shape[:-1], weights.shape[-1]
    flat = weights.detach().reshape(-1, n).float().clamp_min(0)
    has = flat.sum(-1) > 0
    if len(flat) == 0:
        return torch.zeros(shape, dtype=torch.long, device=weights.device), has.view(shape)
    if rule == "argmax":
        idx = flat.argmax(-1)
    elif rule == "sample":
        some = torch.where(has[:, None], flat, torch.ones_like(flat))  # (an empty row: discarded)
        idx = torch.multinomial(some, 1).squeeze(-1)
    else:
        raise ValueError(f"erase rule must be 'sample' or 'argmax', got {rule!r}")
    return torch.where(has, idx, torch.zeros_like(idx)).view(shape), has.view(shape)


def erase_words(
    input_ids: torch.Tensor,
    word_attention: torch.Tensor,
    rows: torch.Tensor,
    token_id: int,
    rule: str = "sample",
) -> torch.Tensor:
    """A copy of input_ids [B,L] in which, for each sample of `rows` (bool [B]), one word chosen
    from word_attention [B,L] (zero outside the words, so only a word can be chosen) is
    `token_id`."""
    out = input_ids.clone()
    idx, has = choose(word_attention, rule)
    r = (rows & has).nonzero().squeeze(1)
    out[r, idx[r]] = token_id
    return out


def erase_cells(
    rois: torch.Tensor,
    cell_attention: torch.Tensor,
    rows: torch.Tensor,
    window: int = 1,
    rule: str = "sample",
) -> torch.Tensor:
    """A copy of the RoI features [B,K,C,P*P] in which, for each sample of `rows`, every candidate
    loses a window x window block of cells, chosen from the block averages of its cell_attention
    [B,K,P*P] (as the official code's avg_pool2d with stride 1 over the 7x7 attention, then a
    draw)."""
    b, k, _, n = rois.shape
    p = math.isqrt(n)
    w = min(window, p)
    q = p - w + 1  # block positions per side
    grid = cell_attention.detach().reshape(b * k, 1, p, p)
    blocks = F.avg_pool2d(grid, w, stride=1).view(b, k, q * q)
    idx, _ = choose(blocks, rule)
    cells = torch.arange(p, device=rois.device)
    in_y = (cells >= (idx // q)[..., None]) & (cells < (idx // q)[..., None] + w)  # [B,K,P]
    in_x = (cells >= (idx % q)[..., None]) & (cells < (idx % q)[..., None] + w)
    drop = (in_y[..., :, None] & in_x[..., None, :]).flatten(-2) & rows[:, None, None]  # [B,K,P*P]
    return rois.masked_fill(drop[:, :, None, :], 0.0)


def erase_items(
    items: torch.Tensor, attention: torch.Tensor, rows: torch.Tensor, rule: str = "sample"
) -> torch.Tensor:
    """A copy of per-candidate items [B,K,M,D] (location items, context objects) in which, for each
    sample of `rows`, every candidate loses one item chosen from its attention [B,K,M] (zero on
    non-items: never chosen; a candidate with no item keeps everything)."""
    idx, has = choose(attention, rule)
    drop = F.one_hot(idx, items.shape[2]).bool() & (has & rows[:, None])[..., None]  # [B,K,M]
    return items.masked_fill(drop[..., None], 0.0)


# -------------------------------------------------------------------------------------------
# modules


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(inplace=True), nn.Linear(d, d))


def _attend(d: int) -> nn.Sequential:
    """Attention logit of an item given a phrase: [item; phrase] -> tanh layer -> 1 (CM-Erase's
    attn_fuse)."""
    return nn.Sequential(nn.Linear(2 * d, d), nn.Tanh(), nn.Linear(d, 1))


def _attention(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax of logits [...,M] over the valid items; all zero where none is valid."""
    has = valid.any(-1, keepdim=True)
    return logits.masked_fill(~valid, -math.inf).masked_fill(~has, 0.0).softmax(-1) * valid


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


class LanguageAttention(nn.Module):
    """Word features [B,L,H] -> phrase embeddings [B,3,d] (subject, location, relation), the word
    attention of each [B,3,L] and the module weights [B,3] (softmax)."""

    def __init__(self, hidden: int, d: int):
        super().__init__()
        self.attend = nn.Linear(hidden, len(MODULES))
        self.embed = nn.Linear(hidden, d)
        self.weights = nn.Linear(hidden, len(MODULES))

    def forward(self, words: torch.Tensor, word_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = (
            self.attend(words).transpose(1, 2).masked_fill(~word_mask[:, None], -math.inf)
        )  # [B,3,L]
        attention = logits.softmax(-1)
        phrases = attention @ self.embed(words)  # [B,3,d]
        weights = self.weights(words[:, 0]).softmax(
            -1
        )  # from the [CLS] output: the whole expression
        return {"phrases": phrases, "word_attention": attention, "weights": weights}


def trim_candidates(batch: dict) -> dict:
    """The batch with its candidate slots cut to the most any of its images has (valid candidates
    come first): RefShapes images hold 3-4 objects, and every module's cost grows with the slots
    (relation: squared)."""
    k = max(int(batch["cand_valid"].sum(1).max()), 1)
    if k == batch["cand_valid"].shape[1]:
        return batch
    return {
        **batch,
        **{key: batch[key][:, :k] for key in ("cand_boxes", "cand_valid", "cand_category")},
    }


def real_words(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B,L]: the expression's words, not [CLS], [SEP] or padding (an empty expression: its
    [CLS], so attention is always over something)."""
    mask = attention_mask.bool().clone()
    mask[:, 0] = False
    last = attention_mask.long().sum(1) - 1
    mask[torch.arange(len(mask), device=mask.device), last] = False
    empty = ~mask.any(1)
    mask[empty, 0] = True
    return mask


@dataclass
class ErasedCopy:
    """One CM-Erase copy of the erased rows, scored: what its loss terms read."""

    logits: torch.Tensor  # [R,K] candidate logits
    scores: torch.Tensor  # [R,K] cosine scores
    rank_keep: torch.Tensor  # [R] rows with a mismatched pair for the hinge term
    neg_expression: Optional[torch.Tensor] = (
        None  # visual copy: the erased object with another expression
    )
    neg_image: Optional[torch.Tensor] = (
        None  # language copy: the erased expression with another image's object
    )


@dataclass
class MAttNetOutput(GroundingOutput):
    """pred_boxes: the best candidate's box; the candidates' scores, and the attention that decided
    them."""

    scores: torch.Tensor = None  # [B,K] sum over modules of weight x cosine
    logits: torch.Tensor = None  # [B,K] scaled scores, FAR on padding slots
    valid: torch.Tensor = None  # [B,K] the candidate slots kept (trim_candidates)
    best: torch.Tensor = None  # [B] the chosen candidate
    word_attention: torch.Tensor = None  # [B,L] module-weighted
    module_weights: torch.Tensor = None  # [B,3]
    cell_attention: torch.Tensor = None  # [B,K,P*P]
    location_attention: torch.Tensor = None  # [B,K,S]
    context_attention: torch.Tensor = None  # [B,K,M]
    module_scores: torch.Tensor = None  # [B,K,3]
    # training only: the hinge terms' mismatched pairs and the erased copies
    neg_expression: Optional[torch.Tensor] = None
    neg_image: Optional[torch.Tensor] = None
    rank_keep: Optional[torch.Tensor] = None
    erased_rows: Optional[torch.Tensor] = None
    erased_language: Optional[ErasedCopy] = None
    erased_visual: Optional[ErasedCopy] = None


@register_model("mattnet", config=MAttNetConfig, needs=("candidates",))
class MAttNet(GroundingModel):
    can_explain = True

    def __init__(self, config: MAttNetConfig, *, tokenizer_dir: Optional[Path] = None, **backbones):
        """`tokenizer_dir`: the prepared tokenizer, whose [MASK] the language erasing writes
        (training only)."""
        super().__init__(config, **backbones)
        c = config
        self.tokenizer_dir = tokenizer_dir
        channels, d = self.visual.out_channels[-1], c.d_model
        self.language = LanguageAttention(self.text.hidden_size, d)
        embed_category = c.category_input == "embedding"
        self.category = nn.Embedding(c.num_categories, d) if embed_category else None
        # subject: cells of the RoI, phrase-guided attention over them, attribute cues
        self.cell = nn.Linear(channels, d)
        self.cell_key = nn.Linear(d, d)
        self.cell_query = nn.Linear(d, d)
        self.cell_score = nn.Linear(d, 1)
        self.colour = nn.Linear(3, d)
        self.subject_out = _mlp(d, d)
        # location: attention over own geometry and the neighbours' offsets (CM-Erase's
        # LocationEncoderAtt)
        self.location_own = nn.Sequential(nn.Linear(5, d), nn.ReLU(inplace=True))
        self.location_offset = nn.Sequential(nn.Linear(5, d), nn.ReLU(inplace=True))
        self.location_attend_own = _attend(d)
        self.location_attend_offset = _attend(d)
        self.location_out = _mlp(d, d)
        # relation: attention over the context objects' appearance and offset (CM-Erase's
        # RelationEncoderAtt)
        self.context_in = nn.Linear(channels + 3 + (d if embed_category else 0) + 5, d)
        self.context_attend = _attend(d)
        self.context_out = _mlp(d, d)
        self.phrase_out = nn.ModuleList(nn.Linear(d, d) for _ in MODULES)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(10.0))
        )  # cosine scores -> candidate logits
        self.erase_token_id: Optional[int] = None  # [MASK], looked up in the tokenizer on first use

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        from refvg.data.prepare import prepared_path
        from refvg.data.text import TOKENIZER_DIR

        return {**super().config_kwargs(cfg), "tokenizer_dir": prepared_path(cfg) / TOKENIZER_DIR}

    # --- the two inputs, encoded once per sample
    def encode_visual(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config
        boxes = cxcywh_to_xyxy(batch["cand_boxes"].float())
        valid = batch["cand_valid"]
        fmap = self.visual(batch["image"])[-1]
        rois = roi_align(fmap, boxes, c.roi_size, c.roi_samples).flatten(3)  # [B,K,C,P*P]
        colour = roi_align(batch["image"], boxes, 1, 4).flatten(2)  # [B,K,3] mean colour of the box
        offsets = pair_offsets(boxes).clamp(-10, 10)  # [B,K,K,5]
        pair_ok = valid[:, None, :] & valid[..., None]
        vis = {}
        neighbour_ok = pair_ok
        if c.category_input != "none":  # MAttNet: offsets to same-category objects only
            category = batch["cand_category"].clamp(0, c.num_categories - 1)
            neighbour_ok = pair_ok & (category[:, None, :] == category[..., None])
            if self.category is not None:
                vis["category"] = category
        idx, real = nearest_others(boxes, neighbour_ok, c.neighbours)
        neighbours = _gather_pairs(offsets, idx) * real[..., None]  # [B,K,N,5]
        x0, y0, x1, y1 = boxes.unbind(-1)
        own = torch.cat([boxes, ((x1 - x0) * (y1 - y0))[..., None]], -1)[:, :, None]  # [B,K,1,5]
        location = torch.cat([own, neighbours], 2)  # [B,K,1+N,5]
        location_valid = torch.cat([real.new_ones(*real.shape[:2], 1), real], 2)  # own: always
        idx, ctx_valid = nearest_others(boxes, pair_ok, c.max_contexts)
        appearance = [rois.mean(-1), colour]
        if self.category is not None:
            appearance.append(self.category(vis["category"]))
        appearance = torch.cat(appearance, -1)  # [B,K,C+3(+d)]
        contexts = (
            torch.cat([_gather_objects(appearance, idx), _gather_pairs(offsets, idx)], -1)
            * ctx_valid[..., None]
        )
        return {
            **vis,
            "rois": rois,
            "colour": colour,
            "location": location,
            "location_valid": location_valid,
            "contexts": contexts,
            "context_valid": ctx_valid,
            "context_index": idx,
            "valid": valid,
        }

    def encode_language(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        words = self.text(input_ids, attention_mask)
        return self.language(words, real_words(input_ids, attention_mask))

    # --- matching
    def score(self, vis: dict, lang: dict) -> dict[str, torch.Tensor]:
        phrases = lang["phrases"]
        q = [proj(phrases[:, i]) for i, proj in enumerate(self.phrase_out)]  # [B,d] each
        # subject
        cells = F.relu(self.cell(vis["rois"].transpose(2, 3)))  # [B,K,P*P,d]
        guide = self.cell_query(phrases[:, 0])[:, None, None]  # the subject phrase
        cell_logits = self.cell_score(torch.tanh(self.cell_key(cells) + guide))
        cell_attention = cell_logits.squeeze(-1).softmax(-1)  # [B,K,P*P]
        attributes = self.colour(vis["colour"])
        if self.category is not None:
            attributes = attributes + self.category(vis["category"])
        subject = (cell_attention[..., None] * cells).sum(2) + attributes
        s_subject = _cosine(self.subject_out(subject), q[0][:, None])
        # location
        loc = vis["location"]
        own, offsets = self.location_own(loc[:, :, :1]), self.location_offset(loc[:, :, 1:])
        items = torch.cat([own, offsets], 2)  # [B,K,S,d]
        guide = phrases[:, 1][:, None, None].expand_as(items)
        loc_logits = torch.cat(
            [
                self.location_attend_own(torch.cat([own, guide[:, :, :1]], -1)),
                self.location_attend_offset(torch.cat([offsets, guide[:, :, 1:]], -1)),
            ],
            2,
        )
        location_attention = _attention(loc_logits.squeeze(-1), vis["location_valid"])  # [B,K,S]
        location = (location_attention[..., None] * items).sum(2)
        s_location = _cosine(self.location_out(location), q[1][:, None])
        # relation
        ctx = self.context_in(vis["contexts"])  # [B,K,M,d]
        guide = phrases[:, 2][:, None, None].expand_as(ctx)
        context_attention = _attention(
            self.context_attend(torch.cat([ctx, guide], -1)).squeeze(-1), vis["context_valid"]
        )  # [B,K,M]
        relation = (context_attention[..., None] * ctx).sum(2)
        has_context = vis["context_valid"].any(-1)
        s_relation = _cosine(self.context_out(relation), q[2][:, None]) * has_context  # none: 0
        modules = torch.stack([s_subject, s_location, s_relation], -1)  # [B,K,3]
        scores = (modules * lang["weights"][:, None]).sum(-1)
        logits = (scores * self.logit_scale.exp()).masked_fill(~vis["valid"], FAR)
        return {
            "scores": scores,
            "logits": logits,
            "cell_attention": cell_attention,
            "location_attention": location_attention,
            "context_attention": context_attention,
            "module_scores": modules,
        }

    def forward(self, batch: dict) -> MAttNetOutput:
        batch = trim_candidates(batch)
        vis = self.encode_visual(batch)
        lang = self.encode_language(batch["input_ids"], batch["attention_mask"])
        scored = self.score(vis, lang)
        best = scored["logits"].argmax(1)
        rows = torch.arange(len(best), device=best.device)
        out = MAttNetOutput(
            pred_boxes=batch["cand_boxes"][rows, best].float(),
            **scored,
            # which words and regions decided it (the attention figure; the erasing reads them too)
            word_attention=(lang["word_attention"] * lang["weights"][..., None]).sum(1),
            module_weights=lang["weights"],
            best=best,
            valid=vis["valid"],
        )
        if self.training:
            target = batch["cand_target"]
            out.neg_expression, out.neg_image, out.rank_keep = self._mismatched(vis, lang, target)
            if self.config.erase.type != "none" and self.config.erase.rate > 0:
                self._erase(batch, vis, lang, out)
        return out

    @torch.no_grad()
    def explain(self, batch: dict) -> dict[str, torch.Tensor]:
        """What decided each prediction (the attention figure): the module-weighted word attention
        [B,L], the module weights [B,3], the chosen candidate [B], its most attended subject cell as
        a box [B,4] (xyxy in the square) and its most attended context object's candidate index [B]
        (-1: none)."""
        batch = trim_candidates(batch)
        was = self.training
        self.eval()
        try:
            vis = self.encode_visual(batch)
            lang = self.encode_language(batch["input_ids"], batch["attention_mask"])
            out = self.score(vis, lang)
        finally:
            self.train(was)
        best = out["logits"].argmax(1)
        rows = torch.arange(len(best), device=best.device)
        p = self.config.roi_size
        cell = out["cell_attention"][rows, best].argmax(-1)
        x0, y0, x1, y1 = cxcywh_to_xyxy(batch["cand_boxes"][rows, best].float()).unbind(-1)
        cx, cy = (cell % p).float(), (cell // p).float()
        w, h = (x1 - x0) / p, (y1 - y0) / p
        cell_box = torch.stack([x0 + cx * w, y0 + cy * h, x0 + (cx + 1) * w, y0 + (cy + 1) * h], -1)
        ctx = out["context_attention"][rows, best]  # [B,M], all zero without a context object
        context = vis["context_index"][rows, best, ctx.argmax(-1)]
        context = torch.where(ctx.amax(-1) > 0, context, torch.full_like(context, -1))
        return {
            "word_attention": (lang["word_attention"] * lang["weights"][..., None]).sum(1),
            "module_weights": lang["weights"],
            "best": best,
            "cell_box": cell_box,
            "context": context,
        }

    def _mismatched(self, vis: dict, lang: dict, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(scores of each sample's target with the next sample's expression, of the next sample's
        target with this sample's expression (the batch rolled by one), which samples have both)."""
        rolled_lang = {k: v.roll(-1, 0) for k, v in lang.items()}
        rolled_vis = {k: v.roll(-1, 0) for k, v in vis.items()}
        rows = torch.arange(len(target), device=target.device)
        t, t_next = target.clamp_min(0), target.roll(-1, 0)
        return (
            self.score(vis, rolled_lang)["scores"][rows, t],
            self.score(rolled_vis, lang)["scores"][rows, t_next.clamp_min(0)],
            (target >= 0) & (t_next >= 0) & (len(target) > 1),
        )

    def _erase(self, batch: dict, vis: dict, lang: dict, out: MAttNetOutput) -> None:
        """Adds to `out` the CM-Erase copies (language, visual) of a `rate` fraction of the batch,
        scored, each with the mismatched pair of its hinge term."""
        e = self.config.erase
        b = len(batch["input_ids"])
        device = batch["input_ids"].device
        rows = (torch.rand(b, device=device) < e.rate).nonzero().squeeze(1)
        if len(rows) == 0:
            return
        sub_vis = {k: v[rows] for k, v in vis.items()}
        sub_lang = {k: v[rows] for k, v in lang.items()}
        target = batch["cand_target"][rows]
        n = torch.arange(len(rows), device=device)
        t, t_next = target.clamp_min(0), target.roll(-1, 0)
        out.erased_rows = rows
        if e.type in ("language", "both"):
            ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
            # shorter expressions enter unchanged (paper)
            long_enough = real_words(ids, mask).sum(1) >= e.min_words
            ids = erase_words(
                ids, out.word_attention[rows], long_enough, self._erase_token(), e.rule
            )
            lang_e = self.encode_language(ids, mask)
            scored = self.score(sub_vis, lang_e)
            rolled = {k: v.roll(-1, 0) for k, v in sub_vis.items()}
            # the paper's term for it: the erased expression with an object it does not describe
            neg_image = self.score(rolled, lang_e)["scores"][n, t_next.clamp_min(0)]
            out.erased_language = ErasedCopy(
                logits=scored["logits"],
                scores=scored["scores"],
                neg_image=neg_image,
                rank_keep=(target >= 0) & (t_next >= 0) & (len(rows) > 1),
            )
        if e.type in ("visual", "both"):
            attention = {
                k: getattr(out, k)[rows]
                for k in ("cell_attention", "location_attention", "context_attention")
            }
            vis_e = self.erase_visual(sub_vis, lang["weights"][rows], attention)
            scored = self.score(vis_e, sub_lang)
            rolled = {k: v.roll(-1, 0) for k, v in sub_lang.items()}
            # the paper's term for it: the erased object with an expression not describing it
            neg_expression = self.score(vis_e, rolled)["scores"][n, t]
            out.erased_visual = ErasedCopy(
                logits=scored["logits"],
                scores=scored["scores"],
                neg_expression=neg_expression,
                rank_keep=(target >= 0) & (len(rows) > 1),
            )

    def erase_visual(
        self, vis: dict, weights: torch.Tensor, attention: dict
    ) -> dict[str, torch.Tensor]:
        """The visual inputs with, per sample, a module chosen from its weights [B,3] and, for every
        candidate, one of that module's items chosen from its attention zeroed: a window of subject
        cells, a location item (own geometry or a neighbour's offset) or a context object
        (CM-Erase's erase_allvisual)."""
        e = self.config.erase
        module, _ = choose(weights, e.rule)
        rois = erase_cells(
            vis["rois"], attention["cell_attention"], module == 0, e.cell_window, e.rule
        )
        location = erase_items(
            vis["location"], attention["location_attention"], module == 1, e.rule
        )
        contexts = erase_items(vis["contexts"], attention["context_attention"], module == 2, e.rule)
        return {**vis, "rois": rois, "location": location, "contexts": contexts}

    def _erase_token(self) -> int:
        """[MASK] of the prepared dataset's tokenizer ([UNK] when it has none); training needs the
        prepared data."""
        if self.erase_token_id is None:
            from refvg.data.text import load_tokenizer

            if self.tokenizer_dir is None:
                raise ValueError(
                    "mattnet erases words with the prepared tokenizer's [MASK]: build it with "
                    "tokenizer_dir (from_config passes the prepared one) or set erase_token_id"
                )
            tok = load_tokenizer(self.tokenizer_dir)
            self.erase_token_id = (
                tok.mask_token_id if tok.mask_token_id is not None else tok.unk_token_id
            )
        return int(self.erase_token_id)

    # --- loss
    @property
    def auxiliary_loss(self) -> bool:
        """Whether compute_loss has an "auxiliary" term (the erased copies; the trainer clips it
        apart)."""
        return self.config.erase.type != "none" and self.config.erase.rate > 0

    def _sample_losses(
        self, logits, scores, valid, target, neg_expression, neg_image, keep
    ) -> tuple:
        ce = candidate_cross_entropy(logits, valid, target)
        pos = scores.gather(1, target.clamp_min(0)[:, None]).squeeze(1)
        return ce, ranking_loss(pos, neg_expression, neg_image, keep, self.config.rank_margin)

    def compute_loss(self, outputs: MAttNetOutput, batch: dict) -> dict[str, torch.Tensor]:
        target = batch["cand_target"]
        ce, rank = self._sample_losses(
            outputs.logits,
            outputs.scores,
            outputs.valid,
            target,
            outputs.neg_expression,
            outputs.neg_image,
            outputs.rank_keep,
        )
        loss = ce + self.config.rank_weight * rank
        erased_ce = erased_rank = loss.new_zeros(())
        for copy in (
            outputs.erased_language,
            outputs.erased_visual,
        ):  # each weighs as much as the sample
            if copy is None:
                continue
            rows = outputs.erased_rows
            c, r = self._sample_losses(
                copy.logits,
                copy.scores,
                outputs.valid[rows],
                target[rows],
                copy.neg_expression,
                copy.neg_image,
                copy.rank_keep,
            )
            erased_ce, erased_rank = erased_ce + c, erased_rank + r
        loss = loss + erased_ce + self.config.rank_weight * erased_rank
        return {
            "loss": loss,
            "ce": ce,
            "rank": rank,
            "erased_ce": erased_ce,
            "erased_rank": erased_rank,
            "auxiliary": erased_ce + self.config.rank_weight * erased_rank,
        }  # the trainer clips it apart
