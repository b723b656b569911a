"""Weakly supervised grounding by Grad-CAM (after the ICLR 2025 submission "Improve weakly
supervised visual grounding by learning where to focus on"): trained on image-sentence pairs only,
never a box.

- Matching. A CNN backbone (model.visual) and the text encoder (model.text) give a visual map A
[B,C,h,w] and
  word features. Two objectives over the batch: an image-text contrastive loss on pooled
  embeddings over the whole in-batch image x expression grid (pairs showing the same image are all
  positives: RefShapes has several expressions per image), and a matching loss of the fusion
  transformer (refvg.models.vl.VLTransformer, its [REG] output -> one logit) on each positive pair
  and one negative image per expression: by default a random other image of the batch. ALBEF's
  hard negatives (drawn from the contrastive similarities, `negatives: hard`) kept the matcher at
  ln 2 here: the images most similar to "the top shape" or "the green circle" are those that hold
  such an object too, so most "negatives" were matches (docs/weak_cam.md). The fusion sees only
  the first `match_fraction` of each (shuffled) batch: it is most of a step's cost, the
  contrastive loss over the whole batch is cheap; the contrastive loss is weighted down
  (itc_weight 0.1) so that its gradient does not fill the clipped update. With
  `contrastive_in_score` (off by default: the Grad-CAM is then of the matcher alone) the matching
  score also adds the pair's contrastive cell-text similarity.
- Checkpoint selection is box-free: `select_metric` (the first pass's matching accuracy on the val
  split's image-sentence pairs, `match_scores`), which refvg.stages hands to the trainer for weak
  models.
- Grad-CAM. alpha_c = mean over cells of d score / d A_c; cam = ReLU(sum_c alpha_c A_c), padding
cells
  zeroed, divided by its peak. Computed inside the forward with torch.autograd.grad, differentiably
  (create_graph) where the attention-mining loss needs to push on it.
- CAM encoder. A small conv net embeds the first pass's CAM into C channels added to A, and the
fusion runs
  again on it (second pass, same weights, its own matching loss): the fusion sees where the first
  pass looked. Its last conv starts at zero, so the second pass starts as the first. The second
  pass's Grad-CAM is the fused CAM, the one a box is read from.
- Attention mining (as in GAIN, Li et al. 2018). A (or the image) is multiplied by 1 - sigmoid((cam
- t) * w), the fused
  CAM's soft complement, and the positive pair's matching score of what remains is penalised
  (softplus(score): BCE towards "no match"). While a part of the object is left outside the CAM the
  remaining image still matches, so the CAM is pushed to cover the whole object, not only its most
  discriminative part. Weight 0 is the ablation (weak_cam_no_mining). `mining_on: image` masks the
  pixels instead (the mask upsampled, another backbone pass): zeroed feature cells are out of
  distribution and the fusion called them a mismatch whatever they hid (the feature-map loss fell to
  ~0.001 at once).
- Localisation (test time): the fused CAM, upsampled to the letterboxed square with padding
excluded, either
  thresholded at a fraction of its peak, keeping the connected region that holds the peak (its tight
  box), or used to rank the candidate boxes (refvg.data.proposals) by CAM mass / area^p.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from refvg.config import FusionConfig
from refvg.data.transforms import cxcywh_to_xyxy
from refvg.losses import multi_positive_nce
from refvg.models.base import GroundingModel, GroundingOutput
from refvg.models.layers import mask_to_box, masked_mean, peak_component
from refvg.models.registry import register_model
from refvg.models.weak_cam_config import WeakCAMConfig
from refvg.models.vl import VLTransformer, downsample_mask


@dataclass
class WeakCAMOutput(GroundingOutput):
    """Test time: the box read off the fused CAM, and the CAMs [B,S,S] over the square."""

    cam: torch.Tensor = None  # the second pass's (fused) CAM, the one the box is read from
    first_cam: torch.Tensor = None
    match: torch.Tensor = None  # [B] second-pass matching logits


@dataclass
class WeakCAMTraining:
    """A training pass (no box is predicted): what the matching, contrastive and mining losses
    read."""

    contrastive_logits: torch.Tensor  # [B,B] image i vs expression j
    same_image: torch.Tensor  # bool [B,B]
    match1: torch.Tensor  # [2b] first-pass logits of b positives then b negatives
    match2: torch.Tensor  # the same, second pass
    match_labels: torch.Tensor
    match_weights: torch.Tensor
    cam: torch.Tensor  # [b,h,w] the positives' fused CAMs (detached)
    mined: Optional[torch.Tensor] = None  # [b] matching logits of what the CAM leaves (mining on)


def grad_cam(
    score: torch.Tensor,
    fmap: torch.Tensor,
    valid: torch.Tensor | None = None,
    create_graph: bool = False,
    per_cell: bool = False,
) -> torch.Tensor:
    """Grad-CAM of per-sample scores [B] w.r.t. a feature map [B,C,h,w] that produced them (sample
    i's score depends only on fmap[i]): ReLU(sum_c mean_hw(d score / d fmap)_c * fmap_c), zero where
    `valid` [B,h,w] is False, divided by each map's peak (an all-zero map stays zero). [B,h,w].
    `create_graph`: differentiable (the gradients' graph is kept, so a loss on the CAM trains the
    weights that made it)."""
    (grads,) = torch.autograd.grad(score.sum(), fmap, create_graph=create_graph, retain_graph=True)
    # per_cell (HiResCAM, Draelos & Carin 2020): each cell's own gradient, not the map's mean,
    # weighs its channels, so a score that rests on single cells (the smooth maximums here) is not
    # blurred across the map
    weights = grads if per_cell else grads.mean((2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(1))
    if valid is not None:
        cam = cam * valid
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def cam_to_square(cam: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Feature-map CAMs [B,h,w] -> [B,S,S] at the letterbox size of `pad` (bool [B,S,S], True =
    padding): bilinear upsampling, padding zeroed, divided by the peak again."""
    sq = F.interpolate(
        cam[:, None].float(), size=pad.shape[-2:], mode="bilinear", align_corners=False
    )[:, 0]
    sq = sq.clamp_min(0).masked_fill(pad, 0)
    return sq / sq.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def threshold_box(cam_sq: torch.Tensor, pad: torch.Tensor, threshold: float) -> torch.Tensor:
    """Box [B,4] (cxcywh normalised to the square) of a peak-normalised square CAM: the connected
    region of cam >= threshold that holds the CAM's peak (refvg.models.layers.peak_component, the
    same read-out CMSA uses for its masks), as its tight box."""
    logits = cam_sq - threshold + 1e-6  # >= threshold -> positive; the peak (1) is always inside
    region = peak_component(logits, pad)
    return mask_to_box(torch.where(region, 1.0, -1.0), pad)


def candidate_scores(
    cam_sq: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, area_power: float
) -> torch.Tensor:
    """Each candidate's CAM mass / area^p, [B,K]; -inf for padding candidates. `boxes` [B,K,4]
    cxcywh normalised to the square; a pixel belongs to a box when its centre lies inside."""
    b, s, _ = cam_sq.shape
    x0, y0, x1, y1 = (cxcywh_to_xyxy(boxes.float()) * s).unbind(-1)  # [B,K] in pixels
    centres = torch.arange(s, device=cam_sq.device, dtype=torch.float32) + 0.5
    in_x = (centres[None, None] >= x0[..., None]) & (centres[None, None] < x1[..., None])  # [B,K,S]
    in_y = (centres[None, None] >= y0[..., None]) & (centres[None, None] < y1[..., None])
    # mass = sum over the box's rows of the CAM summed over its columns: [B,K,S] x [B,S,S] -> no
    # [B,K,S,S]
    mass = torch.einsum("bky,byx,bkx->bk", in_y.float(), cam_sq.float(), in_x.float())
    area = (in_x.sum(-1) * in_y.sum(-1)).clamp_min(1).float()
    return (mass / area**area_power).masked_fill(~valid, float("-inf"))


class CAMEncoder(nn.Module):
    """CAM [B,h,w] -> [B,C,h,w], added to the visual map the fusion reads."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        nn.init.zeros_(self.body[-1].weight)  # the second pass starts as the first
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, cam: torch.Tensor) -> torch.Tensor:
        return self.body(cam[:, None])


class RegionMatchHead(nn.Module):
    """Matching logit of a fused pair: a logit per visual token from the token and the [REG] output
    (which has read the expression), pooled by a smooth maximum (log-mean-exp): the pair matches
    when some place does, so the score, and its Grad-CAM, rest on the described object rather than
    on the scene as a whole."""

    def __init__(self, d_model: int):
        super().__init__()
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, 1)

    def forward(self, reg: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """reg [B,D], visual tokens [B,N,D], pad bool [B,N] (True = padding) -> [B]."""
        logits = self.out(F.gelu(self.key(tokens) * self.query(reg)[:, None])).squeeze(-1).float()
        logits = logits.masked_fill(pad, float("-inf"))
        return logits.logsumexp(-1) - (~pad).sum(-1).float().log()


@register_model("weak_cam", config=WeakCAMConfig, needs=("candidates",), weak=True)
class WeakCAM(GroundingModel):
    # best.pt by a criterion that needs no box: matching accuracy on val image-sentence pairs
    select_metric = "match_acc"

    def __init__(self, config: WeakCAMConfig, *, fusion: FusionConfig, **backbones):
        super().__init__(config, **backbones)
        w = config
        channels = self.visual.out_channels[-1]
        self.fusion = VLTransformer(channels, self.text.hidden_size, fusion, self.text_positions)
        self.match_head = RegionMatchHead(fusion.d_model)
        self.cam_encoder = CAMEncoder(channels, w.cam_channels)
        self.image_embed = nn.Linear(channels, w.embed_dim)
        self.text_embed = nn.Linear(self.text.hidden_size, w.embed_dim)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1 / 0.07))
        )  # CLIP's initial temperature

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        return {**super().config_kwargs(cfg), "fusion": cfg.model.fusion}

    @property
    def auxiliary_loss(self) -> bool:
        """Whether compute_loss has an "auxiliary" term (the mining; the trainer clips its gradient
        apart)."""
        return self.config.mining_weight > 0

    def score(
        self,
        visual: torch.Tensor,
        pixel_mask: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        cam: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Matching logit [B] of (visual map, expression) pairs; with `cam`, the CAM embedding is
        added first."""
        if cam is not None:
            visual = visual + self.cam_encoder(cam).to(visual.dtype)
        reg, tokens = self.fusion(visual, pixel_mask, text, text_mask)
        grid = visual.shape[-2:]
        pad = downsample_mask(pixel_mask, grid).flatten(1)
        logit = self.match_head(reg, tokens[:, -grid[0] * grid[1] :], pad)
        if self.config.contrastive_in_score:
            # The pair's cell-text similarity learns fast (the cheap contrastive loss trains it on
            # the whole batch); in the score, its Grad-CAM points at the cells that match the
            # expression from the start.
            logit = logit + self._pair_similarity(visual, pixel_mask, text, text_mask)
        return logit

    def two_pass_cams(self, visual, pixel_mask, text, text_mask, differentiable: int = 0):
        """(first-pass score and CAM, second-pass score and CAM) of pairs; the second pass reads the
        first CAM (detached: a hint, not a path for gradients). The fused CAMs of the first
        `differentiable` rows keep their graph; those rows take the math attention kernel (the fused
        CPU/GPU kernels have no double backward) and the rest the fast one, which is why the second
        pass runs in two parts."""
        valid = ~downsample_mask(pixel_mask, visual.shape[-2:])
        s1 = self.score(visual, pixel_mask, text, text_mask)
        cam1 = grad_cam(s1, visual, valid, per_cell=self.config.cam_per_cell).detach()
        s2, cam2 = [], []
        for rows in (slice(0, differentiable), slice(differentiable, None)):
            part = (visual[rows], pixel_mask[rows], text[rows], text_mask[rows])
            if len(part[0]) == 0:
                continue
            keep_graph = rows.start == 0 and differentiable > 0
            with sdpa_kernel(SDPBackend.MATH) if keep_graph else contextlib.nullcontext():
                s = self.score(*part, cam=cam1[rows])
                cam2.append(
                    grad_cam(
                        s,
                        part[0],
                        valid[rows],
                        create_graph=keep_graph,
                        per_cell=self.config.cam_per_cell,
                    )
                )
            s2.append(s)
        return s1, cam1, torch.cat(s2), torch.cat(cam2)

    def forward(self, batch: dict) -> WeakCAMOutput | WeakCAMTraining:
        if self.training:
            return self._train_forward(batch)
        with torch.enable_grad():  # Grad-CAM needs gradients, also under the evaluator's no_grad
            return self._localise(batch)

    # ---------------------------------------------------------------- training: pairs, matching,
    # mining
    def _train_forward(self, batch: dict) -> WeakCAMTraining:
        if "image_index" not in batch:
            raise KeyError(
                "weak_cam trains on refvg.data.weak.WeakSplit batches (image-sentence pairs with "
                "their image_index); this batch has none"
            )
        visual = self.visual(batch["image"])[-1]
        words = self.text(batch["input_ids"], batch["attention_mask"])
        pad, tmask = batch["pixel_mask"], batch["attention_mask"]
        logits = self._contrastive_logits(visual, pad, words, tmask)
        same = batch["image_index"][:, None] == batch["image_index"][None, :]
        # per expression: another image, uniformly ("random": zero similarities) or by similarity
        sim = logits.detach().t()
        if self.config.negatives == "random":
            sim = torch.zeros_like(sim)
        neg_image, has_neg = _hard_negatives(sim, same)
        # The fusion (two passes + Grad-CAM, double backward when mining) costs most of a step: it
        # sees the first `match_fraction` of the (shuffled) batch, while the cheap contrastive loss
        # sees all of it.
        b = max(1, round(visual.shape[0] * self.config.match_fraction))
        neg_image, has_neg = neg_image[:b], has_neg[:b]
        visual_all = visual
        visual, pad, words, tmask = visual[:b], pad[:b], words[:b], tmask[:b]
        # Pair rows: B positives, then B (expression, another image). Negatives that pair an image
        # with another expression would teach text discrimination, which the contrastive loss
        # already does, at a third more fusion compute; negative images are what makes the match
        # depend on where the object is.
        pv = torch.cat([visual, visual_all[neg_image]])
        ppad = torch.cat([pad, batch["pixel_mask"][neg_image]])
        pw, ptm = torch.cat([words, words]), torch.cat([tmask, tmask])
        labels = torch.cat([visual.new_ones(b), visual.new_zeros(b)]).float()
        weights = torch.cat([visual.new_ones(b), has_neg.float()]).float()
        mining = self.config.mining_weight > 0
        # Only the positives' fused CAMs are mined, so only they need a differentiable Grad-CAM.
        s1, cam1, s2, cam2 = self.two_pass_cams(
            pv, ppad, pw, ptm, differentiable=b if mining else 0
        )
        out = WeakCAMTraining(
            contrastive_logits=logits,
            same_image=same,
            match1=s1,
            match2=s2,
            match_labels=labels,
            match_weights=weights,
            cam=cam2[:b].detach(),
        )
        if mining:
            keep = 1 - torch.sigmoid(
                (cam2[:b] - self.config.mining_threshold) * self.config.mining_sharpness
            )
            out.mined = self._mined_score(batch["image"][:b], visual, keep, pad, words, tmask)
        return out

    @torch.no_grad()
    def match_scores(self, batch: dict) -> dict[str, torch.Tensor]:
        """First-pass matching logits of image-sentence pairs (WeakSplit rows, no box): "pos" [B]
        of each pair, "neg" [B] of its expression with the previous row's image, "neg_valid" [B]
        where that image is another one. What best.pt is selected by
        (refvg.evaluation.MatchEvaluator)."""
        visual = self.visual(batch["image"])[-1]
        words = self.text(batch["input_ids"], batch["attention_mask"])
        pad, tmask = batch["pixel_mask"], batch["attention_mask"]
        pos = self.score(visual, pad, words, tmask)
        neg = self.score(visual.roll(1, 0), pad.roll(1, 0), words, tmask)
        other = batch["image_index"].roll(1, 0) != batch["image_index"]
        return {"pos": pos, "neg": neg, "neg_valid": other}

    def _mined_score(self, image, visual, keep, pad, words, tmask) -> torch.Tensor:
        """Matching score of what the CAM's soft complement `keep` [b,h,w] leaves: of the visual map
        times it ("feature"), or of the backbone's map of the image times it upsampled ("image": a
        zeroed feature cell is out of distribution for the fusion, which can call it a mismatch
        whatever the rest shows; a zeroed image patch is mean colour, which the CNN has seen, at the
        price of another backbone pass)."""
        if self.config.mining_on == "feature":
            return self.score(visual * keep[:, None].to(visual.dtype), pad, words, tmask)
        up = F.interpolate(
            keep[:, None], size=image.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.score(self.visual(image * up.to(image.dtype))[-1], pad, words, tmask)

    def _contrastive_logits(self, visual, pad, words, tmask) -> torch.Tensor:
        """[B,B]: image i vs expression j, the smooth maximum over i's cells (padding excluded) of
        the scaled cosine similarity of the cell's and the expression's embeddings: an image matches
        an expression when one of its places does (pooling the whole image would blur the object
        with the rest of the scene)."""
        keep, cells, txt = self._embeddings(visual, pad, words, tmask)
        sim = self.logit_scale.clamp(max=math.log(100)).exp() * torch.einsum(
            "ine,je->ijn", cells, txt
        )
        sim = sim.masked_fill(~keep[:, None], float("-inf"))
        return sim.logsumexp(-1) - keep.sum(1, keepdim=True).float().log()

    def _pair_similarity(self, visual, pad, words, tmask) -> torch.Tensor:
        """[B]: the diagonal of `_contrastive_logits` (image i vs expression i) without the [B,B]
        grid."""
        keep, cells, txt = self._embeddings(visual, pad, words, tmask)
        sim = self.logit_scale.clamp(max=math.log(100)).exp() * torch.einsum(
            "ine,ie->in", cells, txt
        )
        sim = sim.masked_fill(~keep, float("-inf"))
        return sim.logsumexp(-1) - keep.sum(1).float().log()

    def _embeddings(self, visual, pad, words, tmask):
        """(valid cells [B,N], unit cell embeddings [B,N,E], unit expression embeddings [B,E])."""
        keep = ~downsample_mask(pad, visual.shape[-2:]).flatten(1)
        cells = F.normalize(self.image_embed(visual.flatten(2).transpose(1, 2)).float(), dim=-1)
        txt = F.normalize(self.text_embed(masked_mean(words.float(), tmask)).float(), dim=-1)
        return keep, cells, txt

    def compute_loss(self, outputs: WeakCAMTraining, batch: dict) -> dict[str, torch.Tensor]:
        w = self.config
        itc = multi_positive_nce(outputs.contrastive_logits, outputs.same_image)
        weights = outputs.match_weights
        itm1 = _weighted_bce(outputs.match1, outputs.match_labels, weights)
        itm2 = _weighted_bce(outputs.match2, outputs.match_labels, weights)
        losses = {"itc": itc, "itm": itm1, "itm_cam": itm2}
        total = w.itc_weight * itc + w.itm_weight * itm1 + w.cam_itm_weight * itm2
        if outputs.mined is not None:
            losses["mining"] = F.softplus(
                outputs.mined
            ).mean()  # -log(1 - p(match)) of what the CAM left
            losses["auxiliary"] = (
                w.mining_weight * losses["mining"]
            )  # the trainer clips its gradient apart
            total = total + losses["auxiliary"]
        losses["loss"] = total
        return losses

    # ---------------------------------------------------------------- test: CAM -> box
    def _localise(self, batch: dict) -> WeakCAMOutput:
        # Detached from the backbone: only d score / d A is needed, not gradients through the CNN.
        visual = self.visual(batch["image"])[-1].detach().requires_grad_(True)
        words = self.text(batch["input_ids"], batch["attention_mask"]).detach()
        pad = batch["pixel_mask"]
        s1, cam1, s2, cam2 = self.two_pass_cams(visual, pad, words, batch["attention_mask"])
        cam_sq = cam_to_square(cam2.detach(), pad)
        box = threshold_box(cam_sq, pad, self.config.box_threshold)
        if self.config.localisation == "candidates":
            if "cand_boxes" not in batch:
                raise KeyError(
                    "weak_cam's localisation is 'candidates' but the batch has no cand_boxes "
                    "(open the split through refvg.stages.open_split)"
                )
            scores = candidate_scores(
                cam_sq, batch["cand_boxes"], batch["cand_valid"], self.config.candidate_area_power
            )
            best = scores.argmax(1)
            picked = batch["cand_boxes"][torch.arange(len(best), device=best.device), best].float()
            has = batch["cand_valid"].any(1)[:, None]
            box = torch.where(
                has, picked, box
            )  # an image without candidates keeps the threshold box
        return WeakCAMOutput(
            pred_boxes=box, cam=cam_sq, first_cam=cam_to_square(cam1, pad), match=s2.detach()
        )


def _hard_negatives(sim: torch.Tensor, same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of similarities [B,B], a column drawn with probability softmax(sim) among the
    columns that are not the row's own image (uniformly for all-zero rows); (index [B], has-one
    [B]). A row with no such column gets itself, flagged."""
    weights = sim.float().softmax(1).masked_fill(same, 0)
    ok = weights.sum(1) > 0
    weights[~ok] = same[~ok].float()  # any column; the pair's loss weight is 0
    return torch.multinomial(weights, 1).squeeze(1), ok


def _weighted_bce(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    return (loss * weights).sum() / weights.sum().clamp_min(1)
