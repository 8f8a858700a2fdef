"""Training backend: segmentation training (DDP-ready), evaluation metrics, MDKD distillation.

config.py       TrainConfig (the recipe, stored with every run)
trainer.py      train(...) -> TrainResult: the named steps that prepare a segmentation run
distill.py      MDKD stages: common KD, ViT-Med teacher, domain KD
refiner_stage.py, heads.py  recipe stages on recorded inputs / cached embeddings
box_decoder_tuning.py       the box refiner's decoder (`delightsam tune-refiner`)
loop.py         run_loop: the one epoch/step loop every run above goes through
batches.py      the seeded, modality-balanced batch stream of an epoch
optim.py        parameter groups (freeze, lr_scale), Adam + exponential decay
model_setup.py  the starting network (preset, LiteMedSAM encoder or checkpoint)
runfolder.py    run-folder files, metrics.jsonl and progress events (RunLog), resume state
validation.py   validation Dice during training
state.py        optimizer/scheduler state as safetensors (resume without pickle)
distributed.py  torchrun / DDP context
errors.py       TrainingError
metrics.py      Dice, HD, HD95 (original grid and 1024 grid)
evaluate.py     dataset evaluation, tables, overlays
plot.py         training curves PNG
"""

from .config import TrainConfig
from .errors import TrainingError
from .trainer import TrainResult, build_model, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "build_model", "train"]
