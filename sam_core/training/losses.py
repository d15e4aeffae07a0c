"""SAM's training losses: focal + dice on mask logits (20:1), MSE between predicted and real IoU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_WEIGHT = 20.0  # the SAM paper's focal:dice ratio
DICE_WEIGHT = 1.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
               alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over valid pixels: logits, target, valid ...xHxW (0/1 float) -> ..."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss * valid
    return loss.flatten(-2).sum(-1) / valid.flatten(-2).sum(-1).clamp(min=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over valid pixels: logits, target, valid ...xHxW -> ..."""
    p = (torch.sigmoid(logits) * valid).flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded logits (> 0) with the target over valid pixels: ...xHxW -> ...
    (no gradient)."""
    with torch.no_grad():
        pred = ((logits > 0) & (valid > 0)).flatten(-2)
        t = target.flatten(-2) > 0.5
        inter = (pred & t).sum(-1).float()
        union = (pred | t).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def sam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
             focal_alpha: float = 0.25):
    """logits BxKxHxW, iou_pred BxK, target BxHxW (0/1 float, 0 outside ``valid``), valid BxHxW
    (1 on image pixels, 0 on the encoder input's padding). ``focal_alpha`` weighs foreground pixels
    (background: 1 - alpha); 0.25 is the usual SAM setting, 0.5 weighs both alike.

    Mask loss is taken on the best of the K outputs per prompt (ambiguity-aware, as in the paper);
    the IoU head is trained on all K. Returns (total loss, mask loss, iou loss, chosen index B,
    IoU of every output BxK).
    """
    t = target[:, None].expand_as(logits)
    v = valid[:, None].expand_as(logits)
    per_output = FOCAL_WEIGHT * focal_loss(logits, t, v, focal_alpha) + DICE_WEIGHT * dice_loss(logits, t, v)  # (B, K)
    best = per_output.argmin(dim=1)
    mask_loss = per_output.gather(1, best[:, None]).mean()
    ious = mask_iou(logits, t, v)
    iou_loss = F.mse_loss(iou_pred, ious)
    return mask_loss + iou_loss, mask_loss, iou_loss, best, ious
