"""Fine-tuning SAM on instance masks with the SAM paper's interactive recipe.

Per mask, prompts are simulated from the ground truth over ``rounds`` rounds: first a point drawn
uniformly inside the mask or a noisy box (std 10% of the box side, at most 20 px), then each round
adds one point drawn uniformly from the error region of the previous prediction (foreground where
it was missed, background where it spilled over) and feeds the previous low-res logits back as the
mask prompt. A single first point asks for the three ambiguity outputs and the loss (focal:dice =
20:1) is taken on the best of them; other prompts use the single-mask output. The IoU head learns
the real IoU of every output (MSE).

``background_points`` > 0 also prompts single points outside every mask of the image (where most
of the automatic generator's grid lands on sparse annotations): their masks get no loss, but the IoU
head learns each output's best IoU with any of the image's masks, so the generator's IoU filter
and NMS scores rank such masks low instead of guessing.

    model = build_sam("vit_b", "sam_vit_b_01ec64.pth")
    history = finetune(model, coco_samples("train.json", "images/"), TrainConfig(steps=2000))
    save_checkpoint(model, "sam_vit_b_finetuned.pth")        # official key layout

Shapes: images HxWx3 uint8 RGB, masks HxW bool, in the image's own pixels.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..modeling import Sam
from ..transforms import ResizeLongestSide
from .losses import sam_loss


@dataclass(frozen=True)
class Sample:
    """One training image and its instance masks."""

    image: np.ndarray  # HxWx3 uint8, RGB
    masks: Sequence[np.ndarray]  # each HxW bool


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-5  # fine-tuning rate; the demo model trains from scratch at 6e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50  # linear warm-up, then cosine decay to 1% of ``lr``
    images_per_step: int = 4
    masks_per_image: int = 8  # ground-truth masks drawn per image and step
    rounds: int = 3  # prompt rounds per mask (first prompt + error-region points)
    box_fraction: float = 0.5  # first prompt is a noisy box for this share of masks, else a point
    train_encoder: bool = False
    train_prompt_encoder: bool = False
    focal_alpha: float = 0.25  # focal-loss weight of foreground pixels (0.5: unbiased)
    background_points: int = 0  # per image and step: IoU-head-only prompts outside every mask
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "images_per_step", "masks_per_image", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.background_points < 0:
            raise ValueError(f"background_points must be >= 0, got {self.background_points}.")
        if not 0.0 <= self.box_fraction <= 1.0:
            raise ValueError(f"box_fraction must be within [0, 1], got {self.box_fraction}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")


def trainable_parameters(model: Sam, config: TrainConfig) -> List[torch.nn.Parameter]:
    """Sets ``requires_grad`` per part (the decoder always trains) and returns the trained ones."""
    parts = {"mask_decoder": True, "prompt_encoder": config.train_prompt_encoder,
             "image_encoder": config.train_encoder}
    params = []
    for name, on in parts.items():
        for p in getattr(model, name).parameters():
            p.requires_grad_(on)
            if on:
                params.append(p)
    return params


def finetune(
    model: Sam,
    samples: Iterable[Sample],
    config: TrainConfig,
    log: Callable[[Dict[str, float]], None] = lambda entry: None,
    on_step: Optional[Callable[[int, Sam], None]] = None,
) -> List[Dict[str, float]]:
    """Train ``model`` in place on ``samples`` (an iterator that may repeat) for ``config.steps``.

    Returns the history: one entry per ``log_every`` steps with mean loss, mask loss, IoU loss and
    the mean IoU of the chosen outputs in the first and last round. ``on_step(step, model)`` runs
    after every optimiser step (e.g. to save checkpoints).
    """
    device = model.device
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    params = trainable_parameters(model, config)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    transform = ResizeLongestSide(model.image_encoder.img_size)
    it: Iterator[Sample] = iter(samples)
    history: List[Dict[str, float]] = []
    window: List[Dict[str, float]] = []
    start = time.perf_counter()
    model.train()
    for step in range(1, config.steps + 1):
        batch = [_prepare(next(it), transform, rng, config.masks_per_image, device, config.background_points > 0)
                 for _ in range(config.images_per_step)]
        batch = [b for b in batch if b is not None]
        if not batch:
            raise ValueError("No training image in this step had a usable mask (all empty after resizing).")
        images = torch.stack([model.preprocess(b[0]) for b in batch])
        with torch.set_grad_enabled(config.train_encoder):
            embeddings = model.image_encoder(images)  # (B, C, h, w)
        owner = torch.cat([torch.full((len(gt),), i, device=device) for i, (_, gt, _, _) in enumerate(batch)])
        gt = torch.cat([g for _, g, _, _ in batch])  # (N, S, S)
        valid = torch.cat([v.expand(len(g), -1, -1) for _, g, v, _ in batch])
        stats = _masks_loss(model, embeddings, owner, gt, valid, rng, config)
        if config.background_points:
            stats["background_iou_loss"] = _background_loss(model, embeddings, batch, config.background_points, rng)
            stats["loss"] = stats["loss"] + stats["background_iou_loss"]
        loss = stats["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        sched.step()
        window.append({k: float(v.detach()) for k, v in stats.items()})
        if step % config.log_every == 0 or step == config.steps:
            entry = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            entry.update(step=step, lr=sched.get_last_lr()[0], seconds=time.perf_counter() - start)
            history.append(entry)
            log(entry)
            window = []
        if on_step is not None:
            on_step(step, model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return history


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _prepare(sample: Sample, transform: ResizeLongestSide, rng: np.random.Generator, k: int,
             device: torch.device, all_masks: bool = False
             ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """Resized image 3xhxw (float, 0-255), up to ``k`` random masks KxSxS (float 0/1, zero-padded
    to the encoder input S), the valid region 1xSxS and, with ``all_masks``, every mask MxSxS
    (bool; else None); None if no mask survives resizing."""
    image = np.ascontiguousarray(sample.image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"Training images must be HxWx3 uint8, got {image.shape} {image.dtype}.")
    resized = transform.apply_image(image)
    h, w = resized.shape[:2]
    size = transform.target_length

    def resized_mask(i: int) -> np.ndarray:
        m = np.asarray(sample.masks[i])
        if m.shape != image.shape[:2]:
            raise ValueError(f"A mask of shape {m.shape} does not match its image {image.shape[:2]}.")
        return np.pad(cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST),
                      ((0, size - h), (0, size - w)))

    every = [resized_mask(i) for i in range(len(sample.masks))] if all_masks else None
    masks = []
    for i in rng.permutation(len(sample.masks)):
        small = every[i] if every is not None else resized_mask(i)
        if small.any():
            masks.append(small)
        if len(masks) == k:
            break
    if not masks:
        return None
    x = torch.as_tensor(resized, device=device).permute(2, 0, 1).float()
    gt = torch.as_tensor(np.stack(masks), device=device).float()
    valid = torch.zeros(1, size, size, device=device)
    valid[:, :h, :w] = 1
    return x, gt, valid, None if every is None else torch.as_tensor(np.stack(every), device=device) > 0


def _background_loss(model: Sam, embeddings: torch.Tensor, batch: Sequence[Tuple], k: int,
                     rng: np.random.Generator) -> torch.Tensor:
    """MSE of the IoU head for ``k`` single-point prompts per image drawn outside every mask
    (embeddings BxCxhxw; ``batch`` as from ``_prepare(..., all_masks=True)``): the target of each
    of the three outputs is its best IoU with any of the image's masks. Images without background
    are skipped."""
    image_pe = model.prompt_encoder.get_dense_pe()
    losses = []
    for i, (_, _, valid, every) in enumerate(batch):
        background = (valid[0] > 0) & ~every.any(0)  # (S, S)
        if not background.any():
            continue
        region = background.expand(k, -1, -1)
        coords = sample_points(region.float(), region, rng)  # (k, 1, 2)
        labels = torch.ones(k, 1, dtype=torch.int, device=coords.device)
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low_res, iou_pred = model.mask_decoder(embeddings[i:i + 1].expand(k, -1, -1, -1), image_pe, sparse, dense,
                                               multimask_output=True)
        size = valid.shape[-1]
        pred = (F.interpolate(low_res.detach(), (size, size), mode="bilinear", align_corners=False) > 0) & (valid > 0)
        losses.append(F.mse_loss(iou_pred, best_iou(pred, every)))
    if not losses:
        return embeddings.new_zeros(())
    return torch.stack(losses).mean()


def best_iou(pred: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Each predicted mask's highest IoU with any of ``masks``: pred ...xHxW bool, masks MxHxW
    bool -> ... float (0 where neither has a pixel)."""
    p = pred.flatten(-2).float()  # (..., P)
    m = masks.flatten(-2).float()  # (M, P)
    inter = p @ m.T  # (..., M)
    union = (p.sum(-1, keepdim=True) + m.sum(-1) - inter).clamp(min=1)
    return (inter / union).amax(-1)


def _masks_loss(model: Sam, embeddings: torch.Tensor, owner: torch.Tensor, gt: torch.Tensor,
                valid: torch.Tensor, rng: np.random.Generator, config: TrainConfig) -> Dict[str, torch.Tensor]:
    """Simulated interactive rounds for every mask of the step: embeddings BxCxhxw, owner N (the
    image of each mask), gt and valid NxSxS. Mean losses and first/last-round IoUs."""
    use_box = torch.as_tensor(rng.random(gt.shape[0]) < config.box_fraction, device=gt.device)
    sums: Dict[str, torch.Tensor] = {}
    for box_first in (False, True):
        idx = torch.nonzero(use_box == box_first)[:, 0]
        if len(idx) == 0:
            continue
        out = _rounds(model, embeddings[owner[idx]], gt[idx], valid[idx], box_first, rng, config)
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value * len(idx)
    return {key: value / gt.shape[0] for key, value in sums.items()}


def _rounds(model: Sam, embeddings: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, box_first: bool,
            rng: np.random.Generator, config: TrainConfig) -> Dict[str, torch.Tensor]:
    """Interactive rounds for masks gt NxSxS (embeddings NxCxhxw) sharing a first-prompt kind."""
    n, size, _ = gt.shape
    image_pe = model.prompt_encoder.get_dense_pe()
    truth = gt > 0.5
    rows = torch.arange(n, device=gt.device)
    boxes = noisy_boxes(gt, rng) if box_first else None
    if box_first:
        coords, labels = torch.zeros(n, 0, 2, device=gt.device), torch.zeros(n, 0, dtype=torch.int, device=gt.device)
    else:
        coords, labels = sample_points(gt, truth, rng), torch.ones(n, 1, dtype=torch.int, device=gt.device)
    mask_input = None
    total, mask_total, iou_total, ious = 0.0, 0.0, 0.0, []
    for r in range(config.rounds):
        multimask = r == 0 and not box_first
        points = (coords, labels) if coords.shape[1] else None
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res, iou_pred = model.mask_decoder(embeddings, image_pe, sparse, dense, multimask_output=multimask)
        logits = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        loss, mask_loss, iou_loss, best, out_ious = sam_loss(logits, iou_pred, gt, valid, config.focal_alpha)
        total, mask_total, iou_total = total + loss, mask_total + mask_loss, iou_total + iou_loss
        ious.append(out_ious[rows, best].mean())
        if r + 1 == config.rounds:
            break
        chosen = (logits[rows, best].detach() > 0) & (valid > 0)  # (n, S, S)
        new = sample_points(gt, chosen ^ truth, rng)  # (n, 1, 2)
        xy = new[:, 0].long()
        new_label = truth[rows, xy[:, 1], xy[:, 0]].int()[:, None]
        coords, labels = torch.cat([coords, new], 1), torch.cat([labels, new_label], 1)
        mask_input = low_res[rows, best].detach()[:, None]  # (n, 1, 4h, 4w) logits
    k = config.rounds
    return {"loss": total / k, "mask_loss": mask_total.detach() / k, "iou_loss": iou_total.detach() / k,
            "first_round_iou": ious[0], "last_round_iou": ious[-1]}


def sample_points(gt: torch.Tensor, region: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One (x, y) pixel per mask drawn uniformly from ``region`` Nxhxw (from ``gt`` where the
    region is empty): Nx1x2 float, in the input frame."""
    n, h, w = gt.shape
    weights = region.reshape(n, -1).float()
    empty = weights.sum(1) == 0
    weights[empty] = (gt.reshape(n, -1)[empty] > 0.5).float()
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**62)))
    # argmax of uniform noise on the region's pixels: a uniform draw among them
    flat = (torch.rand(weights.shape, generator=gen).to(gt.device) * weights).argmax(dim=1)
    return torch.stack([flat % w, flat // w], dim=1).float()[:, None]


def noisy_boxes(gt: torch.Tensor, rng: np.random.Generator, rel_std: float = 0.1, max_px: float = 20.0) -> torch.Tensor:
    """Tight XYXY boxes of gt Nxhxw with each coordinate moved by N(0, 10% of the box side),
    at most ``max_px`` pixels, clipped to the image: Nx4 float."""
    n, h, w = gt.shape
    boxes = np.zeros((n, 4), np.float32)
    g = gt.detach().cpu().numpy() > 0.5
    for i in range(n):
        ys, xs = np.nonzero(g[i])
        boxes[i] = (xs.min(), ys.min(), xs.max(), ys.max())
    side = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, 1)
    noise = np.clip(rng.normal(0, 1, (n, 4)) * rel_std * side, -max_px, max_px)
    boxes = boxes + noise
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w - 1)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h - 1)
    return torch.as_tensor(boxes, device=gt.device)


def save_checkpoint(model: Sam, path: "os.PathLike[str] | str", half: bool = False) -> None:
    """Write the state dict in the official key layout (``sam_model_registry[...]`` and the
    official ``segment_anything`` read it). ``half`` stores float16 (loaders upcast to float32)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    torch.save(state, os.fspath(path))


def config_dict(config: TrainConfig) -> Dict[str, object]:
    return asdict(config)
