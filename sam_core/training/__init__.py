"""Fine-tuning SAM (the paper's interactive recipe), procedural training scenes and data readers."""

from .finetune import Sample, TrainConfig, finetune, save_checkpoint
from .scenes import SceneSpec, make_scene

__all__ = ["Sample", "SceneSpec", "TrainConfig", "finetune", "make_scene", "save_checkpoint"]
