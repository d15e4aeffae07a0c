"""The bundled demo model: the ``demo`` config trained from scratch on procedural scenes.

``python -m jobs.train --demo --output sam_core/weights/sam_demo.pth`` reproduces the shipped file
(same seeds; bit-identical with one CPU thread on the same torch build; with more threads, or
elsewhere, floating-point sums may be reordered and the weights differ in the last bits).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..build import build_sam, set_attention_backend
from ..checkpoint import BUNDLED_CHECKPOINTS
from .data import scene_samples
from .finetune import TrainConfig, finetune, save_checkpoint

WEIGHTS = BUNDLED_CHECKPOINTS["demo"]
MODEL_SEED = 0  # initial weights
SCENE_SEED = 0  # training scenes (stage i uses SCENE_SEED + i); evaluation scenes use seeds >= 1000
# Six stages. Trained together from random weights, encoder and decoder collapse to a constant
# mask (measured: no progress in 300 steps); with the random encoder frozen (stage 0), decoder and
# prompt encoder learn to localise first, then everything trains at a lower rate. Focal alpha 0.5:
# with the usual 0.25 (background-weighted) predictions stay under the threshold for hundreds of
# steps longer. Stages 0, 2 and 3 use one prompt round (the automatic generator's single-point
# case); stage 1 adds the error-region correction round. Each later stage restarts the schedule
# because joint training was still improving when the previous one ended (first-round IoU
# 0.27 -> 0.35 in stage 1, 0.34 -> 0.64 in stage 2, 0.63 -> 0.72 in stage 3, 0.72 -> 0.85 in stage 4;
# stage 4 took automatic-mask recall at IoU 0.8 on held-out scenes from 48% to 83%). Stage 5 (encoder
# frozen) adds background prompts: the generator's grid lands mostly on unannotated background, where
# the IoU head had never been trained and scored stray masks above good ones (correlation of predicted
# and real IoU over all unfiltered candidates 0.36 after stage 4); held-out recall at IoU 0.8 83% -> 90%.
_JOINT = TrainConfig(steps=1800, lr=3e-4, weight_decay=0.05, warmup_steps=100, images_per_step=2,
                     masks_per_image=8, rounds=2, box_fraction=0.3, focal_alpha=0.5, train_encoder=True,
                     train_prompt_encoder=True, seed=1, log_every=50)
DEMO_STAGES = (
    dataclasses.replace(_JOINT, steps=2800, lr=1e-3, rounds=1, train_encoder=False, seed=0),
    _JOINT,
    dataclasses.replace(_JOINT, steps=2000, rounds=1, seed=2),
    dataclasses.replace(_JOINT, steps=1200, rounds=1, seed=3),
    dataclasses.replace(_JOINT, steps=3000, rounds=1, seed=4),
    dataclasses.replace(_JOINT, steps=2400, rounds=1, seed=5, train_encoder=False, background_points=8),
)


def scaled_stages(total_steps: int) -> Tuple[TrainConfig, ...]:
    """The demo stages with ``total_steps`` split between them in the same proportion (for quick runs)."""
    full = sum(c.steps for c in DEMO_STAGES)
    return tuple(dataclasses.replace(c, steps=max(1, round(total_steps * c.steps / full)),
                                     warmup_steps=min(c.warmup_steps, max(1, total_steps // 10)))
                 for c in DEMO_STAGES)


def train_demo(output: str, stages: Sequence[TrainConfig] = DEMO_STAGES, device: Optional[str] = None,
               log: Callable[[Dict[str, float]], None] = print, save_every: int = 200,
               start_stage: int = 0) -> List[Dict[str, float]]:
    """Train the demo model from seeded random weights and write it to ``output`` (every
    ``save_every`` steps and at the end of every stage). ``start_stage`` > 0 resumes from the
    model ``output`` holds after stage ``start_stage - 1``: each stage seeds its own optimiser,
    prompts and scenes, so a resumed run ends with the same weights as an uninterrupted one (bit for
    bit with one thread; see the module docstring)."""
    if start_stage:
        model = build_sam("demo", output, device=device)
    else:
        torch.manual_seed(MODEL_SEED)
        model = build_sam("demo", device=device)
    set_attention_backend(model, "folded")  # no dense N x N bias: 3.5x faster backward on CPU
    history: List[Dict[str, float]] = []
    done = sum(c.steps for c in stages[:start_stage])
    for i, config in enumerate(stages[start_stage:], start=start_stage):
        def checkpoint(step: int, m, offset: int = done) -> None:
            if save_every and (offset + step) % save_every == 0:
                save_checkpoint(m, output)

        def stage_log(entry: Dict[str, float], offset: int = done, stage: int = i) -> None:
            entry.update(step=entry["step"] + offset, stage=stage)
            log(entry)

        history += finetune(model, scene_samples(SCENE_SEED + i), config, log=stage_log, on_step=checkpoint)
        save_checkpoint(model, output)
        done += config.steps
    set_attention_backend(model, "sdpa")
    return history
