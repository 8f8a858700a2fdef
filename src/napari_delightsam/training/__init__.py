"""Training backend: segmentation training (DDP-ready), evaluation metrics, MDKD distillation.

loop/         the one epoch/step loop every run goes through, and what it needs
  run.py          run_loop: schedule, micro-batches, accumulation, hooks, resume, stop
  batches.py      the seeded, modality-balanced batch stream of an epoch
  optim.py        parameter groups (freeze, lr_scale), Adam + exponential decay
  runfolder.py    run-folder files, metrics.jsonl and progress events (RunLog), resume state
  state.py        optimizer/scheduler state as safetensors (resume without pickle)
  distributed.py  torchrun / DDP context
  plot.py         training curves PNG
stages/       the stages that run the loop, and the recipe that chains them
  trainer.py      train(...) -> TrainResult: segmentation training
  heads.py        heads on cached frozen-encoder embeddings (recipe stage "heads")
  refiner_stage.py  one modality's refiner on recorded inputs (recipe stage "refiner")
  appearance_head.py  the appearance head (recipe stage "appearance-head")
  distill.py      MDKD stages: common KD, ViT-Med teacher, domain KD
  box_decoder_tuning.py  the box refiner's decoder (`delightsam tune-refiner`)
  click_tuning.py  its click steps and click validation (`tune-refiner --click-fraction`)
  recipe.py       a recipe (recipes/*.json) run as one resumable command
caches/       inputs computed once and trained on many times
  embedding_cache.py  frozen-encoder embeddings for the heads stage
evaluation/   how a model is scored
  metrics.py      Dice, HD, HD95 (original grid and 1024 grid)
  validation.py   validation Dice during training
  evaluate.py     dataset evaluation, tables, overlays
config.py       TrainConfig (the recipe of a run, stored with every run)
model_setup.py  the starting network (preset, LiteMedSAM encoder or checkpoint)
litemedsam_init.py  LiteMedSAM's TinyViT -> our DC-Encoder; LiteMedSAM as a frozen teacher
errors.py       TrainingError
"""

from .config import TrainConfig
from .errors import TrainingError
from .stages.trainer import TrainResult, build_model, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "build_model", "train"]
