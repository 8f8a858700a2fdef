"""A training recipe: the stages that make a default model, as one resumable command.

``delightsam recipe v1 --data ../shared/data --out runs/v1`` runs ``recipes/v1.json``:

1. **split** — ``splits.json``: the seeded 8:1:1 split per dataset with the recipe's unseen-domain
   hold-out (``data.holdout``), or the file given with ``--splits``;
2. one folder per **stage**, in order: ``"heads"`` stages train on a **cache** of the frozen
   encoder's embeddings (``heads.train_heads``), made just before the stage with the network it
   starts from (``embedding_cache.build_cache_folder``: the training images' ``views`` — the image
   and augmented copies — and the val / unseen images, each capped by the stage's
   ``max_per_dataset`` / ``val_max_per_dataset``, of the stage's ``modalities`` only where it
   names some; ``cache/`` for the first heads stage,
   ``cache-<stage>/`` for later ones); ``"train"`` stages are end-to-end segmentation training
   (``trainer.train``, e.g. modality controllers with the backbone frozen); ``"refiner"`` stages
   train one modality's ``MaskRefiner`` alone on its inputs, recorded once from the network the
   stage starts from (``refiner_stage.train_refiner``); each stage starts
   from the previous stage's ``best.safetensors`` (``init: "previous"``) or from ``init``;
3. **export** — the last stage's best weights in fp16 as ``model.safetensors`` (what
   ``weights/`` ships), with the recipe and every stage's validation in its metadata, plus the
   recipe's ``export_metadata`` (e.g. ``inference_precision: fp32``, measured on the model it
   makes: ``inference.INFERENCE_PRECISION_KEY``).

Every step is resumable: a finished stage (``stage.done``) is skipped, an interrupted one
continues from its ``last`` checkpoint, cache files already computed are kept. Progress events
are the stages' own (``progress(dict)``), plus ``recipe`` events {stage, status}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import TrainingError

__all__ = ["RECIPES", "Recipe", "RecipeStage", "cache_folder_name", "export_model", "load_recipe", "run_recipe"]

#: the recipes shipped with the package (``training/stages/recipes/<name>.json``)
RECIPES = ("v1", "v2", "v2.1", "v2.2", "v2.3", "v2.4")
#: what a stage may be
STAGE_KINDS = ("heads", "train", "refiner", "appearance-head", "graft")
DONE = "stage.done"
SPLITS = "splits.json"
CACHE = "cache"
EXPORT = "model.safetensors"
#: metadata of the last stage's best that the export keeps
KEPT_METADATA_KEYS = (
    "modality_head_trained", "sampling_rule", "train_config", "auto_confidence_threshold", "appearance_head",
)
#: metadata keys the export writes besides the checkpoint format's own (``export_metadata`` may set neither)
EXPORT_METADATA_KEYS = ("recipe", "recipe_stages", *KEPT_METADATA_KEYS)


@dataclass(frozen=True)
class RecipeStage:
    name: str
    #: "heads" (on the embedding cache), "train" (end to end), "refiner" (one modality's
    #: MaskRefiner on its cached inputs, ``refiner_stage``) or "appearance-head" (v2's modality,
    #: channel-order and hue head on the frozen stage 0, ``appearance_head``; its config holds
    #: ``HeadStageConfig`` fields, not ``TrainConfig`` ones) or "graft" (a part of an earlier
    #: stage's model copied into a new part of this one, ``graft``; ``GraftConfig`` fields)
    kind: str
    #: TrainConfig fields of the stage (``init: "previous"`` = the previous stage's best)
    config: dict[str, Any]
    #: "heads" stages: train on these cached views only (None: all)
    views: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    img_size: int
    #: unseen-domain hold-out protocol (``data.holdout.HOLDOUTS``) of the split
    holdout: str
    seed: int
    #: augmented views cached per training image (0 = the image itself)
    views: tuple[int, ...]
    #: TrainConfig fields every stage shares (a stage's own fields win)
    common: dict[str, Any]
    stages: tuple[RecipeStage, ...]
    #: ModelConfig overrides of the network (e.g. the decoder's detail skips)
    model: dict[str, Any] = field(default_factory=dict)
    #: string metadata the full export carries (not the ``--until`` exports), e.g.
    #: ``{"inference_precision": "fp32", "inference_precision_reason": "..."}``
    export_metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        try:
            stages = tuple(
                RecipeStage(
                    str(s["name"]),
                    str(s["kind"]),
                    dict(s.get("config", {})),
                    tuple(s["views"]) if s.get("views") is not None else None,
                )
                for s in data["stages"]
            )
            recipe = cls(
                str(data["name"]),
                str(data.get("description", "")),
                int(data["img_size"]),
                str(data.get("holdout", "none")),
                int(data.get("seed", 0)),
                tuple(int(v) for v in data.get("views", (0,))),
                dict(data.get("common", {})),
                stages,
                dict(data.get("model", {})),
                dict(data.get("export_metadata", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a valid recipe: {exc}") from exc
        for s in recipe.stages:
            if s.kind not in STAGE_KINDS:
                raise ValueError(
                    f"recipe stage {s.name!r}: kind must be one of {', '.join(STAGE_KINDS)}, got {s.kind!r}"
                )
            if s.kind in ("appearance-head", "graft"):  # their own settings, not TrainConfig fields
                from .appearance_head import HeadStageConfig
                from .graft import GraftConfig

                try:
                    (HeadStageConfig if s.kind == "appearance-head" else GraftConfig).from_dict(s.config)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"recipe stage {s.name!r}: {exc}") from None
                continue
            cfg = recipe.stage_config(s)  # every stage's settings must be valid before anything runs
            if s.kind == "refiner":
                from .refiner_stage import check_refiner_config

                try:
                    check_refiner_config(cfg)
                except ValueError as exc:
                    raise ValueError(f"recipe stage {s.name!r}: {exc}") from None
        from ...checkpoint import RESERVED_METADATA_KEYS

        for key, value in recipe.export_metadata.items():
            if not (isinstance(key, str) and isinstance(value, str)):
                raise ValueError(f"recipe export_metadata must map text to text, got {key!r}: {value!r}")
            if key in RESERVED_METADATA_KEYS or key in EXPORT_METADATA_KEYS:
                raise ValueError(f"recipe export_metadata may not set {key!r}: the export writes it")
        if len({s.name for s in recipe.stages}) != len(recipe.stages) or not recipe.stages:
            raise ValueError("a recipe needs at least one stage, with distinct names")
        return recipe

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "img_size": self.img_size,
            "holdout": self.holdout,
            "seed": self.seed,
            "views": list(self.views),
            "common": self.common,
            "model": self.model,
            "export_metadata": self.export_metadata,
            "stages": [
                {"name": s.name, "kind": s.kind, "config": s.config, "views": list(s.views) if s.views else None}
                for s in self.stages
            ],
        }

    def stages_until(self, until: str | None) -> tuple[RecipeStage, ...]:
        """The stages up to and including ``until`` (all of them for None); ValueError if unknown."""
        if until is None:
            return self.stages
        names = [s.name for s in self.stages]
        if until not in names:
            raise ValueError(f"recipe {self.name} has no stage {until!r} (stages: {', '.join(names)})")
        return self.stages[: names.index(until) + 1]

    def stage_config(self, stage: RecipeStage, *, init: str = "litemedsam", **runtime: Any) -> TrainConfig:
        """The stage's ``TrainConfig``: common fields, the stage's own, the model overrides, then
        ``runtime`` (device, splits file...); ``init: "previous"`` is replaced by ``init``.
        The seed is the recipe's unless the stage sets its own (e.g. a continuation that should
        not replay the previous stage's sample order), and so is ``select_on`` (e.g. "val" for a
        stage whose purpose the unseen-domain images must not steer)."""
        data = {**self.common, **stage.config, **runtime}
        if "select_on" in stage.config:
            data["select_on"] = stage.config["select_on"]
        data["img_size"] = self.img_size
        data["seed"] = stage.config.get("seed", self.seed)
        data["model"] = {**self.model, **data.get("model", {})}
        if data.get("init", "previous") == "previous":
            data["init"] = init
        return TrainConfig.from_dict(data)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``RECIPES``) or a recipe JSON file.

    A recipe may build on another: ``{"name": ..., "description": ..., "extends": "v2",
    "stages": [...]}`` is the shipped recipe ``extends`` (resolved the same way, recursively) with
    these stages after its own; the description is this one's, then the parent's. Such a file may
    set nothing else: the stages must chain on the parent's images, split and network."""
    return Recipe.from_dict(_recipe_data(name_or_path, ()))


#: the only fields of a recipe that ``extends`` another
EXTENDING_FIELDS = ("name", "description", "extends", "stages")


def _recipe_data(name_or_path: str | Path, seen: tuple[str, ...]) -> dict[str, Any]:
    text: str
    if str(name_or_path) in RECIPES:
        text = resources.files("napari_delightsam.training.stages").joinpath(f"recipes/{name_or_path}.json").read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no recipe {name_or_path!r}: not one of {', '.join(RECIPES)} and not a file")
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"recipe {name_or_path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or "extends" not in data:
        return data
    parent_name = str(data["extends"])
    if parent_name not in RECIPES:
        raise ValueError(f"recipe {name_or_path}: extends {parent_name!r}, not one of {', '.join(RECIPES)}")
    if parent_name in seen:
        raise ValueError(f"recipe {name_or_path}: extends itself ({' -> '.join((*seen, parent_name))})")
    extra = sorted(set(data) - set(EXTENDING_FIELDS))
    if extra:
        raise ValueError(
            f"recipe {name_or_path} extends {parent_name} and may set only {', '.join(EXTENDING_FIELDS)}, "
            f"not {', '.join(extra)}"
        )
    parent = _recipe_data(parent_name, (*seen, parent_name))
    own = str(data.get("description", "")).strip()
    return {
        **parent,
        "name": str(data.get("name", name_or_path)),
        "description": f"{own} {parent.get('description', '')}".strip(),
        "stages": [*parent["stages"], *data.get("stages", [])],
    }


ProgressFn = Callable[[dict[str, Any]], None]


def run_recipe(
    recipe: Recipe,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    splits_file: str | Path | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    stop_event: Any = None,
    show_progress: bool = True,
    until: str | None = None,
    start_at: str | None = None,
    init: str | Path | None = None,
) -> Path:
    """Run (or continue) ``recipe`` in ``out_dir``; returns the exported model file.

    ``until``: run the stages up to and including this one and export its best weights as
    ``model-<until>.safetensors`` (the same command without it continues with the later stages).
    ``start_at`` with ``init``: the stages before ``start_at`` are taken as done by the model file
    ``init`` (e.g. v2's last stage from the v1 recipe's export), and the recipe runs on from there.
    """
    from ...checkpoint import read_checkpoint_info
    from ...data import discover, load_splits, make_splits, save_splits, select
    from ...data.holdout import holdout_by_name
    from ..loop.runfolder import write_json
    from .heads import train_heads
    from .refiner_stage import train_refiner
    from .trainer import BEST, LAST, train

    emit = progress or (lambda event: None)
    stages = recipe.stages_until(until)  # an unknown stage fails before anything is written
    if (start_at is None) != (init is None):
        raise ValueError("start_at and init go together: the stage to start at and the model that stands for the ones before")
    if start_at is not None:
        names = [s.name for s in stages]
        if start_at not in names:
            raise ValueError(f"recipe {recipe.name} has no stage {start_at!r} up to the end asked for (stages: {', '.join(names)})")
        if not Path(init).is_file():  # type: ignore[arg-type]
            raise ValueError(f"init: {init} is not a file")
        stages = stages[names.index(start_at):]
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stored = out / "recipe.json"
    if stored.is_file():
        previous = json.loads(stored.read_text(encoding="utf-8"))
        if previous != recipe.to_dict():
            raise TrainingError(f"{out} holds a run of another recipe ({previous.get('name')}); use a new --out")
    else:
        write_json(stored, recipe.to_dict())

    # 1. the split
    records = discover(data_root)
    split_path = out / SPLITS
    if not split_path.is_file():
        if splits_file is not None:
            splits = load_splits(splits_file)
        else:
            splits = make_splits(records, seed=recipe.seed, holdout=holdout_by_name(recipe.holdout))
        save_splits(split_path, splits)
    splits = load_splits(split_path)

    # 2. the stages (best picked on in-domain + unseen-domain validation where the split has both);
    # a "heads" stage first caches the embeddings of the frozen encoder it starts from
    select_on = "val+unseen" if select(records, splits, "unseen") else "val"
    init = str(Path(init).resolve()) if init is not None else "litemedsam"
    last_best: Path | None = None
    heads_names = [s.name for s in recipe.stages if s.kind == "heads"]
    for stage in stages:
        folder = out / stage.name
        if stage.kind == "appearance-head":
            if not (folder / DONE).is_file():
                from .appearance_head import HeadStageConfig, train_head_stage

                emit({"event": "recipe", "stage": stage.name, "status": "start"})
                folder.mkdir(parents=True, exist_ok=True)
                _, report = train_head_stage(init, data_root, split_path, folder / BEST,
                                             HeadStageConfig.from_dict(stage.config), progress=progress,
                                             metrics=folder / "metrics.jsonl")
                (folder / DONE).write_text(json.dumps(report["calibration"], default=float), encoding="utf-8")
                emit({"event": "recipe", "stage": stage.name, "status": "done"})
            else:
                emit({"event": "recipe", "stage": stage.name, "status": "skipped (done)"})
            last_best = folder / BEST
            init = str(last_best)
            continue
        if stage.kind == "graft":
            _run_graft_stage(stage, folder, out, init, emit)
            last_best = folder / BEST
            init = str(last_best)
            continue
        cfg = recipe.stage_config(
            stage, init=init, device=device, splits_file=str(split_path.resolve()), select_on=select_on
        )
        if (folder / DONE).is_file():
            emit({"event": "recipe", "stage": stage.name, "status": "skipped (done)"})
        else:
            resume = (folder / LAST).is_file()
            if stage.kind == "heads":
                cache = out / cache_folder_name(stage.name, heads_names)
                _build_stage_cache(cfg, records, splits, cache, recipe, emit)
            emit({"event": "recipe", "stage": stage.name, "status": "resume" if resume else "start"})
            if stage.kind == "heads":
                result = train_heads(
                    cfg, cache, folder, progress, stop_event, views=stage.views, resume=resume,
                    show_progress=show_progress,
                )
            elif stage.kind == "refiner":
                result = train_refiner(
                    cfg, folder, data_root=data_root, progress=progress, stop_event=stop_event, resume=resume,
                    show_progress=show_progress,
                )
            else:
                result = train(
                    cfg, folder, data_root=data_root, progress=progress, stop_event=stop_event, resume=resume,
                    show_progress=show_progress,
                )
            if result.stopped:
                raise TrainingError(f"stopped in stage {stage.name}; run the same command again to continue")
            (folder / DONE).write_text(json.dumps({"best_select_dice": result.best_val_dice}), encoding="utf-8")
            emit({"event": "recipe", "stage": stage.name, "status": "done"})
        last_best = folder / BEST
        init = str(last_best)

    # 3. export: the last stage's best, fp16
    assert last_best is not None
    stages_meta = {}
    for stage in stages:
        _, m = read_checkpoint_info(out / stage.name / BEST)
        stages_meta[stage.name] = json.loads(m.get("training", "{}"))
    target = out / (EXPORT if until is None else f"model-{until}.safetensors")
    exported = export_model(recipe, last_best, stages_meta, target, final=until is None)
    emit({"event": "recipe", "stage": "export", "status": "done", "path": str(exported)})
    return exported


def _run_graft_stage(stage: RecipeStage, folder: Path, out: Path, init: str, emit: ProgressFn) -> None:
    """A "graft" stage (``graft.graft``): ``init`` with a part copied from an earlier stage's best."""
    from .graft import GraftConfig, graft
    from .trainer import BEST

    if (folder / DONE).is_file():
        emit({"event": "recipe", "stage": stage.name, "status": "skipped (done)"})
        return
    cfg = GraftConfig.from_dict(stage.config)
    source = out / cfg.source_stage / BEST
    if not source.is_file():
        raise TrainingError(
            f"stage {stage.name} copies from stage {cfg.source_stage}, whose best checkpoint {source} is missing "
            "(a run started with --start-at: put that stage's model file there first)"
        )
    emit({"event": "recipe", "stage": stage.name, "status": "start"})
    folder.mkdir(parents=True, exist_ok=True)
    try:
        graft(init, source, folder / BEST, cfg)
    except ValueError as exc:
        raise TrainingError(f"stage {stage.name}: {exc}") from None
    (folder / DONE).write_text(json.dumps({"source": cfg.source_stage}), encoding="utf-8")
    emit({"event": "recipe", "stage": stage.name, "status": "done"})


def cache_folder_name(stage: str, heads_stages: list[str]) -> str:
    """The run folder's embedding cache of a "heads" stage: ``cache`` for the recipe's first
    one, ``cache-<stage>`` for later ones (they start from another encoder)."""
    return CACHE if stage == heads_stages[0] else f"{CACHE}-{stage}"


def _build_stage_cache(
    cfg: TrainConfig, records: list[Any], splits: Any, folder: Path, recipe: Recipe, emit: ProgressFn
) -> None:
    """The frozen encoder's embeddings for a "heads" stage: val and unseen images (≤
    ``val_max_per_dataset`` per dataset, else ``max_per_dataset``), and the recipe's ``views`` of
    the training images (≤ ``max_per_dataset``), made with the network the stage starts from
    (``cfg.init``, with its model settings: e.g. masks at the decoder's output size).
    Files already made with the same encoder are kept (``build_cache_folder``)."""
    from ...data import select
    from ...devices import autocast_dtype, resolve_device
    from ..caches.embedding_cache import build_cache_folder
    from ..model_setup import build_model

    emit({"event": "recipe", "stage": folder.name, "status": "start"})
    model, _ = build_model(cfg)
    if cfg.init == "litemedsam":
        model.encoder.neutralise_controllers()
    # the encoder runs where and in the precision the stage trains (bf16 on a CPU with native bf16)
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(device, cfg.amp, cpu=cfg.amp_cpu)
    model.to(device).eval()
    eval_cap = cfg.val_max_per_dataset or cfg.max_per_dataset
    for split, views, cap in (
        ("val", (0,), eval_cap),
        ("unseen", (0,), eval_cap),
        ("train", recipe.views, cfg.max_per_dataset),
    ):
        chosen = [r for r in select(records, splits, split, cap) if cfg.modalities is None or r.modality in cfg.modalities]
        if chosen:
            build_cache_folder(
                model,
                chosen,
                folder,
                split,
                views=views,
                seed=recipe.seed,
                device=device,
                autocast_dtype=dtype,
                keep_skip=True,
                progress=lambda key, done, total, split=split: emit(
                    {"event": "cache", "split": split, "dataset": key, "done": done, "total": total}
                ),
            )
    emit({"event": "recipe", "stage": folder.name, "status": "done"})


def export_model(
    recipe: Recipe, best: str | Path, stages_meta: dict[str, Any], target: str | Path, *, final: bool = True
) -> Path:
    """The recipe's export step: ``best`` in fp16 at ``target`` with the kept metadata of
    ``best``, the recipe, ``stages_meta`` (each stage's validation) and, for the ``final``
    model, the recipe's ``export_metadata``."""
    import torch

    from ...checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint

    _, meta = read_checkpoint_info(best)
    meta = {k: v for k, v in meta.items() if k in KEPT_METADATA_KEYS}
    meta.update({"recipe": json.dumps(recipe.to_dict()), "recipe_stages": json.dumps(stages_meta)})
    if final:
        meta.update(recipe.export_metadata)
    return save_checkpoint(target, load_checkpoint(best), meta, dtype=torch.float16)
