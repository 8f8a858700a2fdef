"""Training backend: segmentation training (DDP-ready), evaluation metrics, MDKD distillation.

config.py       TrainConfig (the recipe, stored with every run)
trainer.py      train(...) -> TrainResult
state.py        optimizer/scheduler state as safetensors (resume without pickle)
distributed.py  torchrun / DDP context
metrics.py      Dice, HD, HD95 (original grid and 1024 grid)
evaluate.py     dataset evaluation, tables, overlays
distill.py      MDKD stages: common KD, ViT-Med teacher, domain KD
plot.py         training curves PNG
"""

from .config import TrainConfig
from .trainer import TrainingError, TrainResult, build_model, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "build_model", "train"]
