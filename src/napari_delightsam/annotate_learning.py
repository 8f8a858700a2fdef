"""Learning as you go: fine-tune on the masks an annotation session saved, adopt the result only
when it beats the current model on saved images kept out of training.

A :class:`Learner` belongs to an :class:`~napari_delightsam.annotate.AnnotationSession`. One
*round* (:meth:`Learner.run_round`, a generator; :meth:`Learner.run_round_blocking` drains it)

1. takes the images saved so far (in the order they were saved) and keeps every
   ``holdout_every``-th one out of training (positions 0, k, 2k, ... of that order: an image
   held out once is held out in every later round, so no model is ever scored on an image it
   trained on);
2. fine-tunes the *current* model on the rest in a child process (``delightsam train``, the
   fine-tune widget's path: ``widgets.finetune_job.TrainingProcess``, at a lower priority),
   validating on the held-out images;
3. scores the current model and the new one (``best.safetensors``) on the held-out images at
   inference, as the annotator segments them (``Segmenter.segment``, threshold 0.5, another child
   process), and **adopts the new model only if its mean Dice is higher** (by more than
   ``margin``) **and it leaves no more stray regions** per image (``stray_regions``: predicted
   regions the saved mask has nothing of, a click each to remove); a tie keeps the current model.

Every round lives in ``<output>/.delightsam/finetune/round-NNN/`` (``train/best.safetensors`` is
its model; the copied training images and the trainer's resume state are removed after
training). ``learning.json`` beside the rounds records each decision and the current model; it is rewritten atomically only after a
decision, so a crash or a closed window mid-round loses nothing: the next session picks the last
adopted model, and the bundled weights are never written.

``python -m napari_delightsam.annotate_learning evaluate REQUEST.json`` is the scoring child.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import MODALITIES
from .widgets.finetune_job import USER_DATASET, FinetuneSettings, TrainingPair, TrainingProcess, tile_size_for

if TYPE_CHECKING:
    from .annotate import AnnotationSession

__all__ = [
    "FINETUNE_DIR",
    "LEARNING_FILE",
    "LearnConfig",
    "Learner",
    "RoundResult",
    "accepts",
    "dice",
    "split_saved",
    "stray_regions",
]

#: the session's fine-tune rounds, relative to its output folder
FINETUNE_DIR = Path(".delightsam") / "finetune"
LEARNING_FILE = "learning.json"
LEARNING_FORMAT = "napari-delightsam annotate learning v1"
BUNDLED = "bundled"
UNTRAINED = "untrained"
THRESHOLD = 0.5

#: files of a round's run folder removed after training (only best.safetensors is kept)
PRUNED = ("last.safetensors", "last_state.safetensors")
#: builds the training child's command: (settings, data root, run folder, splits file) -> argv
CommandBuilder = Callable[[FinetuneSettings, Path, Path, Path], list[str]]


#: the longest side a round trains at on a CPU (the fine-tune widget's cap)
CPU_MAX_IMG_SIZE = 512


def default_finetune() -> FinetuneSettings:
    """A short round: 2 epochs x 10 steps, controllers + prompt generator train; ``img_size`` 0 =
    the starting model's own size (at most 512 on a CPU), as it is the size the model segments at."""
    return FinetuneSettings(epochs=2, steps_per_epoch=10, img_size=0, batch_size=2)


def _img_size(settings: FinetuneSettings) -> int:
    """The round's training size: the one given, else the starting model's (capped on a CPU)."""
    if settings.img_size > 0:
        return int(settings.img_size)
    native = 256
    if settings.init:
        from .checkpoint import read_checkpoint_info

        native = int(read_checkpoint_info(settings.init)[0].img_size)
    from .devices import resolve_device

    try:
        cpu = resolve_device(settings.device).type == "cpu"
    except ValueError:
        cpu = True
    return min(native, CPU_MAX_IMG_SIZE) if cpu else native


@dataclass
class LearnConfig:
    """When and how a session fine-tunes."""

    #: fine-tune after every ``every`` saved images (0: only when asked)
    every: int = 0
    #: every k-th saved image (from the first) is kept out of training for validation
    holdout_every: int = 4
    #: a round needs at least this many training images (and one held-out image)
    min_train: int = 2
    #: the new model must beat the current one's mean held-out Dice by more than this
    margin: float = 0.0
    device: str = "auto"
    finetune: FinetuneSettings = field(default_factory=default_finetune)


@dataclass
class RoundResult:
    """What one round did; ``status``: accepted | rejected | failed | stopped | skipped."""

    round: int
    status: str
    message: str
    base: str
    candidate: str | None = None
    dice_current: float | None = None
    dice_candidate: float | None = None
    #: mean stray regions per held-out image (predicted regions the saved mask has nothing of:
    #: each costs the annotator a click), current and new model
    stray_current: float | None = None
    stray_candidate: float | None = None
    train: list[str] = field(default_factory=list)
    holdout: list[str] = field(default_factory=list)
    saved: int = 0
    seconds: float = 0.0
    time: str = ""

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


def split_saved(names: Sequence[str], holdout_every: int) -> tuple[list[str], list[str]]:
    """(training names, held-out names): positions 0, k, 2k... of the saved order are held out."""
    k = max(2, int(holdout_every))
    holdout = [n for i, n in enumerate(names) if i % k == 0]
    train = [n for i, n in enumerate(names) if i % k != 0]
    return train, holdout


def accepts(dice_current: float, dice_candidate: float, margin: float = 0.0,
            stray_current: float | None = None, stray_candidate: float | None = None) -> bool:
    """The adoption rule: the new model's mean held-out Dice is higher by more than ``margin``
    and, where counted, it leaves no more stray regions per held-out image than the current one
    (a model that finds more of each object but also more false regions can cost the annotator
    more clicks: measured on 40 polyp frames, ``benchmarks/annotate_loop.py``)."""
    better = bool(np.isfinite(dice_candidate)) and dice_candidate > dice_current + margin
    if stray_current is None or stray_candidate is None:
        return better
    return better and stray_candidate <= stray_current


def stray_regions(pred: np.ndarray, truth: np.ndarray) -> int:
    """Connected regions of ``pred`` (8-connectivity) that share no pixel with ``truth``."""
    from skimage.measure import label as connected

    comps = connected(np.asarray(pred) > 0, connectivity=2)
    if not comps.any():
        return 0
    touched = set(np.unique(comps[np.asarray(truth) > 0]).tolist()) - {0}
    return int(comps.max()) - len(touched)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks (any label > 0 is foreground); two empty masks agree (1.0)."""
    a, b = np.asarray(pred) > 0, np.asarray(truth) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _utc_now() -> str:
    from .widgets.core import utc_now

    return utc_now()


class Learner:
    """The fine-tune rounds of one annotation session (see the module doc)."""

    def __init__(self, session: AnnotationSession, config: LearnConfig | None = None) -> None:
        self.session = session
        self.config = config or LearnConfig()
        self.dir = session.output / FINETUNE_DIR
        self.rounds: list[dict[str, Any]] = []
        self.current: str | None = None
        self._load()

    # -- state ------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.dir / LEARNING_FILE

    def _load(self) -> None:
        try:
            record = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(record, dict) or record.get("format") != LEARNING_FORMAT:
            return
        rounds = record.get("rounds")
        self.rounds = [r for r in rounds if isinstance(r, dict)] if isinstance(rounds, list) else []
        current = record.get("current")
        # the last adopted model, if its file is still there (else the chosen model)
        if isinstance(current, str) and (self.dir / current).is_file():
            self.current = current

    def _write(self) -> None:
        from .atomic_files import atomic_write

        self.dir.mkdir(parents=True, exist_ok=True)
        record = {"format": LEARNING_FORMAT, "current": self.current, "rounds": self.rounds}
        text = json.dumps(record, indent=2) + "\n"
        atomic_write(self.state_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @property
    def current_path(self) -> Path | None:
        """The last adopted fine-tuned model (a file in the session's run folder), or None."""
        return None if self.current is None else (self.dir / self.current).resolve()

    def model_for(self, base: str) -> str:
        """What segments the next image: the last adopted model, else ``base``."""
        return str(self.current_path) if self.current_path is not None else base

    def describe(self, spec: str | None) -> str:
        """A short name for a model choice: "fine-tuned round 2 (held-out Dice 0.81 > 0.74)"."""
        if spec is None:
            return "?"
        if spec in (BUNDLED, UNTRAINED):
            return f"{spec} model"
        path = Path(spec).resolve()
        for r in reversed(self.rounds):
            cand = r.get("candidate")
            if cand and (self.dir / cand).resolve() == path:
                text = f"fine-tuned round {r['round']}"
                if r.get("dice_candidate") is not None and r.get("dice_current") is not None:
                    text += (f" (held-out Dice {r['dice_candidate']:.3f} > {r['dice_current']:.3f}, "
                             f"{len(r.get('holdout') or [])} images)")
                return text
        return path.name

    @property
    def saved_at_last_round(self) -> int:
        done = [r for r in self.rounds if r.get("status") in ("accepted", "rejected", "failed")]
        return int(done[-1].get("saved", 0)) if done else 0

    def saved_names(self) -> list[str]:
        """The session's saved images (in the order saved) whose mask is still there."""
        s = self.session
        out = []
        for name in list(s.saved):  # a snapshot: the GUI thread may save while a round starts
            if name in s._by_name and s.is_done(s.index_of(name)) and not s.is_unreadable(s.index_of(name)):
                out.append(name)
        return out

    def due(self) -> bool:
        """Whether ``every`` more images were saved since the last finished round."""
        every = int(self.config.every)
        return every > 0 and len(self.saved_names()) - self.saved_at_last_round >= every

    def _next_round_number(self) -> int:
        numbers = [int(m.group(1)) for p in self.dir.glob("round-*") if (m := re.fullmatch(r"round-(\d+)", p.name))]
        numbers += [int(r.get("round", 0)) for r in self.rounds]
        return max(numbers, default=0) + 1

    # -- data -------------------------------------------------------------------------------

    def modality_of(self, name: str) -> str | None:
        """The modality an image's mask was made for: its sidecar's choice, else the session's."""
        from .widgets.export import sidecar_path

        s = self.session
        mask = s.existing_mask(s.index_of(name))
        record: dict[str, Any] = {}
        if mask is not None:
            try:
                record = json.loads(sidecar_path(mask).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = {}
        for value in (record.get("modality"), record.get("modality_used"), s.settings.get("modality")):
            if value in MODALITIES:
                return str(value)
        return None

    def pairs(self, names: Sequence[str]) -> list[TrainingPair]:
        """(image, saved mask, modality) of each name; images without a known modality are left out."""
        from .image_files import read_image
        from .widgets.export import read_labels

        s = self.session
        out = []
        for name in names:
            modality = self.modality_of(name)
            mask_path = s.existing_mask(s.index_of(name))
            if modality is None or mask_path is None:
                continue
            image = read_image(s.entries[s.index_of(name)].path)
            rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
            out.append(TrainingPair(image=image, labels=read_labels(mask_path), modality=modality, name=name, rgb=rgb))
        return out

    # -- a round ----------------------------------------------------------------------------

    def _init_for(self, base: str) -> str | None:
        if base == UNTRAINED:
            return None
        if base == BUNDLED:
            from .checkpoint import bundled_checkpoint_path

            path = bundled_checkpoint_path()
            return None if path is None else str(path)
        return str(base)

    def run_round(
        self,
        base: str,
        *,
        holder: dict[str, Any] | None = None,
        command_builder: CommandBuilder | None = None,
        exact: bool = False,
    ) -> Generator[dict[str, Any] | None, None, RoundResult]:
        """Fine-tune the model that segments now (``model_for(base)``, or ``base`` itself with
        ``exact``: the napari panel passes the model it uses) on the saved images, score it
        against the new one on the held-out images, adopt the better (see the module doc).

        Yields the trainer's events (plus ``{"event": "round", ...}`` phases and ``None``
        heartbeats) and returns the :class:`RoundResult`. ``holder["job"]`` is the running child;
        ``holder["stop"] = True`` (or closing the generator) stops it, and nothing is adopted.
        """
        holder = {} if holder is None else holder
        started = time.perf_counter()
        current = base if exact else self.model_for(base)
        names = self.saved_names()
        train_names, holdout_names = split_saved(names, self.config.holdout_every)
        number = self._next_round_number()
        result = RoundResult(round=number, status="skipped", message="", base=current, saved=len(names),
                             train=train_names, holdout=holdout_names, time=_utc_now())
        if len(train_names) < max(1, self.config.min_train) or not holdout_names:
            result.message = (f"{len(names)} saved images: a round needs {self.config.min_train} to train on "
                              f"and 1 held out (every {max(2, self.config.holdout_every)}th)")
            return result
        root = self.dir / f"round-{number:03d}"
        root.mkdir(parents=True, exist_ok=True)
        data = root / "data"
        yield {"event": "round", "phase": "data", "round": number, "train": len(train_names),
               "holdout": len(holdout_names), "model": current}
        train_pairs, holdout_pairs = self.pairs(train_names), self.pairs(holdout_names)
        if not train_pairs or not holdout_pairs:
            result.message = "no saved image has a known modality (choose the session's modality)"
            return result
        settings = FinetuneSettings(**{**asdict(self.config.finetune), "init": self._init_for(current)})
        settings.device = self.config.device if settings.device == "auto" else settings.device
        settings.img_size = _img_size(settings)
        splits = _write_round_data(train_pairs, holdout_pairs, data, root / "splits.json", tile_size_for(settings))
        run_dir = root / "train"
        builder = command_builder or _train_command
        job: TrainingProcess | None = None
        try:
            job = TrainingProcess(builder(settings, data, run_dir, splits), log_path=root / "train.log").start()
            holder["job"] = job
            if holder.get("stop"):
                job.stop()
            yield {"event": "round", "phase": "training", "round": number}
            end: dict[str, Any] | None = None
            for event in job.events():
                if event is not None and event.get("event") == "end":
                    end = event
                yield event
        finally:
            if job is not None and job.running:  # the generator was closed: stop the child
                job.stop(grace_s=10.0, wait=True)
            shutil.rmtree(data, ignore_errors=True)
            for name in PRUNED:  # the trainer's resume state: a round is never resumed
                (run_dir / name).unlink(missing_ok=True)
        candidate = run_dir / "best.safetensors"
        assert job is not None
        if holder.get("stop") or job.stop_requested:
            result.status, result.message = "stopped", "stopped before the new model was scored; nothing adopted"
            return self._record(result, started)
        if job.returncode != 0 or not candidate.is_file():
            tail = job.stderr_tail(3).splitlines()
            result.status = "failed"
            result.message = "training failed: " + (tail[-1] if tail else f"exit code {job.returncode}")
            return self._record(result, started)
        result.candidate = str(candidate.relative_to(self.dir))
        yield {"event": "round", "phase": "evaluating", "round": number, "end": end}
        scores = yield from self._score({"current": current, "candidate": str(candidate)}, holdout_pairs,
                                        root, holder, settings.device)
        if scores is None:
            result.status = "stopped" if holder.get("stop") else "failed"
            result.message = "scoring the models on the held-out images did not finish"
            return self._record(result, started)
        result.dice_current = float(np.mean(scores["dice"]["current"]))
        result.dice_candidate = float(np.mean(scores["dice"]["candidate"]))
        strays = scores["stray"]
        if strays.get("current") and strays.get("candidate"):  # a child that reports them
            result.stray_current = float(np.mean(strays["current"]))
            result.stray_candidate = float(np.mean(strays["candidate"]))
        n = len(holdout_pairs)
        dice_better = accepts(result.dice_current, result.dice_candidate, self.config.margin)
        if dice_better and accepts(result.dice_current, result.dice_candidate, self.config.margin,
                                   result.stray_current, result.stray_candidate):
            result.status = "accepted"
            self.current = result.candidate
            result.message = f"adopted: held-out Dice {result.dice_candidate:.3f} > {result.dice_current:.3f} on {n} images"
        elif dice_better:
            result.status = "rejected"
            result.message = (f"kept the current model: the new one's held-out Dice is higher ({result.dice_candidate:.3f} "
                              f"> {result.dice_current:.3f}) but it leaves more stray regions "
                              f"({result.stray_candidate:.2f} > {result.stray_current:.2f} per image) on {n} images")
        else:
            result.status = "rejected"
            result.message = (f"kept the current model: held-out Dice of the new one {result.dice_candidate:.3f} "
                              f"is not above {result.dice_current:.3f} on {n} images")
        return self._record(result, started)

    def _score(self, models: dict[str, str], pairs: Sequence[TrainingPair], root: Path,
               holder: dict[str, Any], device: str
               ) -> Generator[dict[str, Any] | None, None, dict[str, dict[str, list[float]]] | None]:
        from .atomic_files import atomic_write

        s = self.session
        items = [{"image": str(s.entries[s.index_of(p.name)].path),
                  "mask": str(s.existing_mask(s.index_of(p.name))), "modality": p.modality} for p in pairs]
        request = root / "evaluate.json"
        text = json.dumps({"models": models, "items": items, "device": device}, indent=1)
        atomic_write(request, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        job = TrainingProcess([sys.executable, "-m", "napari_delightsam.annotate_learning", "evaluate", str(request)],
                              log_path=root / "evaluate.log").start()
        holder["job"] = job
        scores: dict[str, dict[str, list[float]]] | None = None
        try:
            for event in job.events():
                if event is not None and event.get("event") == "evaluated":
                    scores = {kind: {k: [float(x) for x in v] for k, v in event.get(kind, {}).items()}
                              for kind in ("dice", "stray")}
                yield event
        finally:
            if job.running:
                job.stop(grace_s=5.0)
        if job.stop_requested or job.returncode != 0:
            return None
        return scores

    def _record(self, result: RoundResult, started: float) -> RoundResult:
        result.seconds = round(time.perf_counter() - started, 2)
        self.rounds.append(asdict(result))
        self._write()
        return result

    def run_round_blocking(self, base: str, *, progress: Callable[[dict[str, Any]], None] | None = None,
                           command_builder: CommandBuilder | None = None) -> RoundResult:
        """:meth:`run_round` to its end (the command line, tests)."""
        gen = self.run_round(base, command_builder=command_builder)
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            if event is not None and progress is not None:
                progress(event)


def _train_command(settings: FinetuneSettings, data: Path, run_dir: Path, splits: Path) -> list[str]:
    from .widgets.finetune_job import build_train_command

    return build_train_command(settings, data, run_dir) + ["--splits", str(splits)]


def _write_round_data(train: Sequence[TrainingPair], holdout: Sequence[TrainingPair], root: Path,
                      splits_path: Path, tile_size: int | None = None) -> Path:
    """The pairs in the dataset layout (large microscopy and fundus images as the tiles the model
    will segment: ``finetune_job.pair_samples``), and a splits file: the training pairs train,
    the held-out ones validate (the trainer keeps its best checkpoint on them)."""
    from .data.splits import Splits, save_splits
    from .widgets.finetune_job import write_dataset

    shutil.rmtree(root, ignore_errors=True)
    pairs = [*train, *holdout]
    write_dataset(pairs, root, tile_size=tile_size)
    assignments: dict[str, dict[str, list[str]]] = {}
    for image in sorted(root.glob(f"*/{USER_DATASET}/images/*")):
        modality = image.parent.parent.parent.name
        index = int(image.stem[1:image.stem.index("_")])  # write_dataset's ids: p<index>_<name>
        parts = assignments.setdefault(f"{modality}/{USER_DATASET}", {"train": [], "val": [], "test": [], "unseen": []})
        parts["train" if index < len(train) else "val"].append(image.stem)
    return save_splits(splits_path, Splits(seed=0, ratios=(0.8, 0.2, 0.0), assignments=assignments, group_rule="annotate"))


# -- the scoring child ------------------------------------------------------------------------


def evaluate_request(request: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per model, its Dice and its stray regions (``stray_regions``) on each item (image file, mask
    file, modality), as the annotator segments: ``{"dice": {model: [...]}, "stray": {model: [...]}}``."""
    from .image_files import read_image
    from .inference import load_model
    from .widgets.export import read_labels

    out: dict[str, dict[str, list[float]]] = {"dice": {}, "stray": {}}
    items = [(read_image(i["image"]), read_labels(i["mask"]), i["modality"]) for i in request["items"]]
    for label, spec in request["models"].items():
        segmenter = load_model(None if spec == BUNDLED else spec, device=request.get("device", "auto"))
        preds = [segmenter.segment(image, modality, THRESHOLD).mask for image, _, modality in items]
        out["dice"][label] = [dice(p, mask) for p, (_, mask, _) in zip(preds, items, strict=True)]
        out["stray"][label] = [float(stray_regions(p, mask)) for p, (_, mask, _) in zip(preds, items, strict=True)]
        del segmenter
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "evaluate":
        print("usage: python -m napari_delightsam.annotate_learning evaluate REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(args[1]).read_text(encoding="utf-8"))
    scores = evaluate_request(request)
    sys.stdout.write(json.dumps({"event": "evaluated", **scores}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover - the scoring child
    sys.exit(main())
