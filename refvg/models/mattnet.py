"""MAttNet-style candidate ranking (Yu et al., CVPR 2018) trained with CM-Erase (Liu et al., CVPR 2019,
"Improving Referring Expression Grounding With Cross-Modal Attention-Guided Erasing").

The model scores each candidate box of the image (ground-truth objects or a detector's boxes, see
refvg.data.proposals) against the expression and outputs the best one's box:
- language attention: three word attentions over the expression give a subject, a location and a relation
  phrase embedding, and a softmax over three gives the modules' weights;
- subject module: the candidate's region of the backbone map pooled by RoI align (:func:`roi_align`, bilinear
  sampling with `grid_sample`) into roi_size x roi_size cells, a phrase-guided spatial attention over the cells,
  plus attribute cues (the region's mean colour and the candidate's category embedding);
- location module: the candidate's normalised geometry [x0, y0, x1, y1, area] and its offsets to up to
  `neighbours` nearest same-category candidates;
- relation module: up to `max_contexts` nearest other candidates as context objects (their pooled feature,
  colour, category and offset), each matched with the relation phrase; the best context gives the score;
- score = sum over modules of weight x cosine(module feature, phrase). Loss: cross-entropy over the valid
  candidates (a sample whose target is not among them adds none) + a hinge ranking loss against a mismatched
  expression and a mismatched image of the batch.

CM-Erase (training only, `model.mattnet.erase`): from the model's own attention on the sample, a copy is
built with the most dominant evidence erased - the most attended word replaced by [MASK] (language), or
for every candidate its most attended subject cell or most attended context object zeroed, whichever of the
two modules weighs more (visual) - and trained on with the same loss, so the model learns complementary
evidence instead of one dominant cue.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from refvg.config import Config, MAttNetConfig
from refvg.data.transforms import cxcywh_to_xyxy
from refvg.models.backbones import build_text_encoder, build_visual_backbone
from refvg.models.registry import register_model
from refvg.models.transvg import backbone_param_groups

MODULES = ("subject", "location", "relation")
FAR = -1e4  # the logit of a padding candidate (not -inf: a row of them must stay finite)


# ------------------------------------------------------------------------------------------- geometry

def roi_align(fmap: torch.Tensor, boxes_xyxy: torch.Tensor, size: int, samples: int = 2) -> torch.Tensor:
    """RoI align: fmap [B,C,H,W] covering [0,1]^2, boxes [B,K,4] xyxy in that frame -> [B,K,C,size,size].
    Each bin averages samples x samples bilinear samples at the centres of its sub-bins (as torchvision's
    RoIAlign with aligned=True); a map value sits at its pixel centre ((j + 0.5) / W)."""
    b, c, _, _ = fmap.shape
    k = boxes_xyxy.shape[1]
    n = size * samples
    t = (torch.arange(n, device=fmap.device, dtype=fmap.dtype) + 0.5) / n  # sub-bin centres in the box
    x0, y0, x1, y1 = boxes_xyxy.to(fmap.dtype).unbind(-1)  # [B,K]
    xs = x0[..., None] + t * (x1 - x0)[..., None]  # [B,K,n]
    ys = y0[..., None] + t * (y1 - y0)[..., None]
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), -1)  # [B,K,n(y),n(x),2]
    grid = grid.reshape(b, k * n, n, 2) * 2 - 1  # grid_sample: -1/+1 are the map's outer edges
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)  # [B,C,K*n,n]
    out = out.view(b, c, k, size, samples, size, samples).mean((4, 6))
    return out.permute(0, 2, 1, 3, 4)


def pair_offsets(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """[B,K,K,5]: candidate j relative to candidate i, MAttNet's offset
    [(x0_j - cx_i) / w_i, (y0_j - cy_i) / h_i, (x1_j - cx_i) / w_i, (y1_j - cy_i) / h_i, area_j / area_i]."""
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    w, h = (x1 - x0).clamp_min(1e-3), (y1 - y0).clamp_min(1e-3)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rel = [(x0[:, None, :] - cx[..., None]) / w[..., None], (y0[:, None, :] - cy[..., None]) / h[..., None],
           (x1[:, None, :] - cx[..., None]) / w[..., None], (y1[:, None, :] - cy[..., None]) / h[..., None],
           (w * h)[:, None, :] / (w * h)[..., None]]
    return torch.stack(rel, -1)


def nearest_others(boxes_xyxy: torch.Tensor, allowed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each candidate, the indices [B,K,n] of its n nearest (centre distance) others where `allowed`
    [B,K,K] is True, and which of those slots are real [B,K,n] (False: fewer than n allowed)."""
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

def candidate_cross_entropy(logits: torch.Tensor, valid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target over the valid candidates; samples whose target is not among the
    candidates (target -1) add nothing (0 when none has one)."""
    has = target >= 0
    if not has.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[has].masked_fill(~valid[has], FAR), target[has])


def ranking_loss(pos: torch.Tensor, neg_expression: torch.Tensor, neg_image: torch.Tensor, keep: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """MAttNet's hinge ranking loss, averaged over the samples `keep` marks:
    max(0, margin - S(o_i, r_i) + S(o_i, r_j)) + max(0, margin - S(o_i, r_i) + S(o_k, r_i)),
    with r_j a mismatched expression and o_k an object of a mismatched image."""
    if not keep.any():
        return pos.sum() * 0.0
    pos, ne, ni = pos[keep], neg_expression[keep], neg_image[keep]
    return (F.relu(margin - pos + ne) + F.relu(margin - pos + ni)).mean()


# ------------------------------------------------------------------------------------------- erasing

def erase_words(input_ids: torch.Tensor, word_attention: torch.Tensor, rows: torch.Tensor,
                token_id: int) -> torch.Tensor:
    """A copy of input_ids [B,L] in which, for each sample of `rows` (bool [B]), the most attended word
    (argmax of word_attention [B,L], zero outside the words) is `token_id`."""
    out = input_ids.clone()
    top = word_attention.argmax(1)
    r = rows.nonzero().squeeze(1)
    out[r, top[r]] = token_id
    return out


def erase_cells(rois: torch.Tensor, cell_attention: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of the RoI features [B,K,C,P*P] in which, for each sample of `rows`, every candidate's most
    attended cell (argmax of cell_attention [B,K,P*P]) is zero."""
    drop = F.one_hot(cell_attention.argmax(-1), rois.shape[-1]).bool() & rows[:, None, None]  # [B,K,P*P]
    return rois.masked_fill(drop[:, :, None, :], 0.0)


def erase_contexts(contexts: torch.Tensor, context_scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of the context inputs [B,K,M,D] in which, for each sample of `rows`, every candidate's most
    attended context object (argmax of context_scores [B,K,M], non-contexts already at -inf) is zero."""
    drop = F.one_hot(context_scores.argmax(-1), contexts.shape[2]).bool() & rows[:, None, None]  # [B,K,M]
    return contexts.masked_fill(drop[..., None], 0.0)


# ------------------------------------------------------------------------------------------- modules

def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(inplace=True), nn.Linear(d, d))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


class LanguageAttention(nn.Module):
    """Word features [B,L,H] -> phrase embeddings [B,3,d] (subject, location, relation), the word attention of
    each [B,3,L] and the module weights [B,3] (softmax)."""

    def __init__(self, hidden: int, d: int):
        super().__init__()
        self.attend = nn.Linear(hidden, len(MODULES))
        self.embed = nn.Linear(hidden, d)
        self.weights = nn.Linear(hidden, len(MODULES))

    def forward(self, words: torch.Tensor, word_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.attend(words).transpose(1, 2).masked_fill(~word_mask[:, None], -math.inf)  # [B,3,L]
        attention = logits.softmax(-1)
        phrases = attention @ self.embed(words)  # [B,3,d]
        weights = self.weights(words[:, 0]).softmax(-1)  # from the [CLS] output: the whole expression
        return {"phrases": phrases, "word_attention": attention, "weights": weights}


def trim_candidates(batch: dict) -> dict:
    """The batch with its candidate slots cut to the most any of its images has (valid candidates come first):
    RefShapes images hold 3-4 objects, and every module's cost grows with the slots (relation: squared)."""
    k = max(int(batch["cand_valid"].sum(1).max()), 1)
    if k == batch["cand_valid"].shape[1]:
        return batch
    return {**batch, **{key: batch[key][:, :k] for key in ("cand_boxes", "cand_valid", "cand_category")}}


def real_words(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B,L]: the expression's words, not [CLS], [SEP] or padding (an empty expression: its [CLS], so
    attention is always over something)."""
    mask = attention_mask.bool().clone()
    mask[:, 0] = False
    last = attention_mask.long().sum(1) - 1
    mask[torch.arange(len(mask), device=mask.device), last] = False
    empty = ~mask.any(1)
    mask[empty, 0] = True
    return mask


class MAttNet(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, pad_token_id: int):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        c: MAttNetConfig = m.mattnet
        self.c = c
        self.visual = build_visual_backbone(m.visual, image_size=cfg.data.image_size)
        self.text = build_text_encoder(m.text, vocab_size, pad_token_id, max_positions=max(64, cfg.data.max_tokens))
        channels, d = self.visual.out_channels[-1], c.d_model
        self.language = LanguageAttention(self.text.hidden_size, d)
        self.category = nn.Embedding(c.num_categories, d)
        # subject: cells of the RoI, phrase-guided attention over them, attribute cues
        self.cell = nn.Linear(channels, d)
        self.cell_key = nn.Linear(d, d)
        self.cell_query = nn.Linear(d, d)
        self.cell_score = nn.Linear(d, 1)
        self.colour = nn.Linear(3, d)
        self.subject_out = _mlp(d, d)
        # location: own geometry + offsets to same-category neighbours
        self.location_out = _mlp(5 + 5 * c.neighbours, d)
        # relation: each context object's appearance and offset
        self.context_out = _mlp(channels + 3 + d + 5, d)
        self.phrase_out = nn.ModuleList(nn.Linear(d, d) for _ in MODULES)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # cosine scores -> candidate logits
        self.erase_token_id: Optional[int] = None  # [MASK], looked up in the tokenizer on first use

    # --- the two inputs, encoded once per sample
    def encode_visual(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.c
        boxes = cxcywh_to_xyxy(batch["cand_boxes"].float())
        valid = batch["cand_valid"]
        category = batch["cand_category"].clamp(0, c.num_categories - 1)
        fmap = self.visual(batch["image"])[-1]
        rois = roi_align(fmap, boxes, c.roi_size, c.roi_samples).flatten(3)  # [B,K,C,P*P]
        colour = roi_align(batch["image"], boxes, 1, 4).flatten(2)  # [B,K,3] mean colour of the box
        offsets = pair_offsets(boxes).clamp(-10, 10)  # [B,K,K,5]
        pair_ok = valid[:, None, :] & valid[..., None]
        same = pair_ok & (category[:, None, :] == category[..., None])
        idx, real = nearest_others(boxes, same, c.neighbours)
        neighbours = (_gather_pairs(offsets, idx) * real[..., None]).flatten(2)  # [B,K,5N]
        x0, y0, x1, y1 = boxes.unbind(-1)
        location = torch.cat([boxes, ((x1 - x0) * (y1 - y0))[..., None], neighbours], -1)
        idx, ctx_valid = nearest_others(boxes, pair_ok, c.max_contexts)
        appearance = torch.cat([rois.mean(-1), colour, self.category(category)], -1)  # [B,K,C+3+d]
        contexts = torch.cat([_gather_objects(appearance, idx), _gather_pairs(offsets, idx)], -1) * ctx_valid[..., None]
        return {"rois": rois, "colour": colour, "category": category, "location": location,
                "contexts": contexts, "context_valid": ctx_valid, "context_index": idx, "valid": valid}

    def encode_language(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        words = self.text(input_ids, attention_mask)
        return self.language(words, real_words(input_ids, attention_mask))

    # --- matching
    def score(self, vis: dict, lang: dict) -> dict[str, torch.Tensor]:
        q = [proj(lang["phrases"][:, i]) for i, proj in enumerate(self.phrase_out)]  # [B,d] each
        cells = F.relu(self.cell(vis["rois"].transpose(2, 3)))  # [B,K,P*P,d]
        guide = self.cell_query(lang["phrases"][:, 0])[:, None, None]  # the subject phrase
        cell_logits = self.cell_score(torch.tanh(self.cell_key(cells) + guide))
        cell_attention = cell_logits.squeeze(-1).softmax(-1)  # [B,K,P*P]
        attributes = self.colour(vis["colour"]) + self.category(vis["category"])
        subject = (cell_attention[..., None] * cells).sum(2) + attributes
        s_subject = _cosine(self.subject_out(subject), q[0][:, None])
        s_location = _cosine(self.location_out(vis["location"]), q[1][:, None])
        context_scores = _cosine(self.context_out(vis["contexts"]), q[2][:, None, None])  # [B,K,M]
        context_scores = context_scores.masked_fill(~vis["context_valid"], -math.inf)
        s_relation = context_scores.amax(-1)
        s_relation = torch.where(torch.isfinite(s_relation), s_relation, torch.zeros_like(s_relation))  # no context
        modules = torch.stack([s_subject, s_location, s_relation], -1)  # [B,K,3]
        scores = (modules * lang["weights"][:, None]).sum(-1)
        logits = (scores * self.logit_scale.exp()).masked_fill(~vis["valid"], FAR)
        return {"scores": scores, "logits": logits, "cell_attention": cell_attention,
                "context_scores": context_scores, "module_scores": modules}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        batch = trim_candidates(batch)
        vis = self.encode_visual(batch)
        lang = self.encode_language(batch["input_ids"], batch["attention_mask"])
        out = self.score(vis, lang)
        best = out["logits"].argmax(1)
        rows = torch.arange(len(best), device=best.device)
        out["pred_boxes"] = batch["cand_boxes"][rows, best].float()
        # which words and regions decided it (the attention figure; the erasing reads them too)
        out["word_attention"] = (lang["word_attention"] * lang["weights"][..., None]).sum(1)  # [B,L]
        out["module_weights"] = lang["weights"]
        out["best"] = best
        out["valid"] = vis["valid"]  # the candidate slots kept (trim_candidates)
        if self.training:
            target = batch["cand_target"]
            out.update(self._mismatched(vis, lang, target, prefix=""))
            if self.c.erase.type != "none" and self.c.erase.rate > 0:
                out.update(self._erased(batch, vis, lang, out))
        return out

    @torch.no_grad()
    def explain(self, batch: dict) -> dict[str, torch.Tensor]:
        """What decided each prediction (the attention figure): the module-weighted word attention [B,L], the
        module weights [B,3], the chosen candidate [B], its most attended subject cell as a box [B,4] (xyxy in
        the square) and its most attended context object's candidate index [B] (-1: none)."""
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
        p = self.c.roi_size
        cell = out["cell_attention"][rows, best].argmax(-1)
        x0, y0, x1, y1 = cxcywh_to_xyxy(batch["cand_boxes"][rows, best].float()).unbind(-1)
        cx, cy = (cell % p).float(), (cell // p).float()
        w, h = (x1 - x0) / p, (y1 - y0) / p
        cell_box = torch.stack([x0 + cx * w, y0 + cy * h, x0 + (cx + 1) * w, y0 + (cy + 1) * h], -1)
        ctx = out["context_scores"][rows, best]  # [B,M]
        slot = ctx.argmax(-1)
        context = vis["context_index"][rows, best, slot]
        context = torch.where(torch.isfinite(ctx.amax(-1)), context, torch.full_like(context, -1))
        return {"word_attention": (lang["word_attention"] * lang["weights"][..., None]).sum(1),
                "module_weights": lang["weights"], "best": best, "cell_box": cell_box, "context": context}

    def _mismatched(self, vis: dict, lang: dict, target: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """Scores of each sample's target with the next sample's expression, and of the next sample's target
        with this sample's expression (the batch rolled by one)."""
        rolled_lang = {k: v.roll(-1, 0) for k, v in lang.items()}
        rolled_vis = {k: v.roll(-1, 0) for k, v in vis.items()}
        rows = torch.arange(len(target), device=target.device)
        t, t_next = target.clamp_min(0), target.roll(-1, 0)
        return {f"{prefix}neg_expression": self.score(vis, rolled_lang)["scores"][rows, t],
                f"{prefix}neg_image": self.score(rolled_vis, lang)["scores"][rows, t_next.clamp_min(0)],
                f"{prefix}rank_keep": (target >= 0) & (t_next >= 0) & (len(target) > 1)}

    def _erased(self, batch: dict, vis: dict, lang: dict, out: dict) -> dict[str, torch.Tensor]:
        """The CM-Erase copy of a `rate` fraction of the batch, scored, with its own mismatched pairs."""
        e = self.c.erase
        b = len(batch["input_ids"])
        device = batch["input_ids"].device
        rows = (torch.rand(b, device=device) < e.rate).nonzero().squeeze(1)
        if len(rows) == 0:
            return {}
        language = torch.full((len(rows),), e.type == "language", dtype=torch.bool, device=device)
        if e.type == "both":
            language = torch.rand(len(rows), device=device) < 0.5
        ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
        ids = erase_words(ids, out["word_attention"][rows].detach(), language, self._erase_token())
        sub = {k: v[rows] for k, v in vis.items()}
        weights = lang["weights"][rows].detach()
        visual = ~language
        on_subject = visual & (weights[:, 0] >= weights[:, 2])  # the dominant of the two erasable modules
        sub["rois"] = erase_cells(sub["rois"], out["cell_attention"][rows].detach(), on_subject)
        sub["contexts"] = erase_contexts(sub["contexts"], out["context_scores"][rows].detach(), visual & ~on_subject)
        lang_e = self.encode_language(ids, mask)
        scored = self.score(sub, lang_e)
        target = batch["cand_target"][rows]
        return {"erased_logits": scored["logits"], "erased_scores": scored["scores"], "erased_rows": rows,
                "erased_valid": sub["valid"], **self._mismatched(sub, lang_e, target, prefix="erased_")}

    def _erase_token(self) -> int:
        """[MASK] of the prepared dataset's tokenizer ([UNK] when it has none); training needs the prepared data."""
        if self.erase_token_id is None:
            from refvg.data.prepare import prepared_path
            from refvg.data.text import TOKENIZER_DIR, load_tokenizer

            tok = load_tokenizer(prepared_path(self.cfg) / TOKENIZER_DIR)
            self.erase_token_id = tok.mask_token_id if tok.mask_token_id is not None else tok.unk_token_id
        return int(self.erase_token_id)

    # --- loss
    @property
    def auxiliary_loss(self) -> bool:
        """Whether compute_loss has an "auxiliary" term (the erased copies; the trainer clips it apart)."""
        return self.c.erase.type != "none" and self.c.erase.rate > 0

    def _sample_losses(self, logits, scores, valid, target, neg_expression, neg_image, keep) -> tuple:
        ce = candidate_cross_entropy(logits, valid, target)
        pos = scores.gather(1, target.clamp_min(0)[:, None]).squeeze(1)
        return ce, ranking_loss(pos, neg_expression, neg_image, keep, self.c.rank_margin)

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        target = batch["cand_target"]
        ce, rank = self._sample_losses(outputs["logits"], outputs["scores"], outputs["valid"], target,
                                       outputs["neg_expression"], outputs["neg_image"], outputs["rank_keep"])
        loss = ce + self.c.rank_weight * rank
        erased_ce = erased_rank = loss.new_zeros(())
        if "erased_logits" in outputs:
            erased_ce, erased_rank = self._sample_losses(
                outputs["erased_logits"], outputs["erased_scores"], outputs["erased_valid"],
                target[outputs["erased_rows"]], outputs["erased_neg_expression"], outputs["erased_neg_image"],
                outputs["erased_rank_keep"])
            loss = loss + erased_ce + self.c.rank_weight * erased_rank
        return {"loss": loss, "ce": ce, "rank": rank, "erased_ce": erased_ce, "erased_rank": erased_rank,
                "auxiliary": erased_ce + self.c.rank_weight * erased_rank}  # the trainer clips it apart

    def param_groups(self, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
        return backbone_param_groups(self, ("visual.", "text."), lr, lr_backbone, weight_decay)


@register_model("mattnet", needs=("candidates",))
def build_mattnet(cfg: Config, vocab_size: int, pad_token_id: int) -> MAttNet:
    return MAttNet(cfg, vocab_size, pad_token_id)
