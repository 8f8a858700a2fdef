"""Fine-tuning as a child process (napari- and Qt-free).

The fine-tune widget never trains in the napari process: it writes the (image, labels) layer
pairs into a temporary folder in the dataset layout, starts
``python -m napari_delightsam.cli train --progress-jsonl ...`` and reads one JSON object per
stdout line (``start`` / ``step`` / ``epoch`` / ``end`` / ``warning`` events of
``napari_delightsam.training.train``). The GUI thread keeps its full speed (no GIL shared with
the training loop) and a stop is an ordinary signal: SIGINT first (the trainer validates,
keeps its best checkpoint and reports ``end``), then terminate, then kill.

Dataset layout written here (what ``delightsam train --data`` reads)::

    <root>/<modality>/user/images/<id>.png|.tif     (uint8 grey/RGB as PNG, other dtypes as TIFF)
    <root>/<modality>/user/masks/<id>.png           (uint8, 0 = background, 255 = target)
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import MODALITIES
from ..devices import cpu_supports_bf16, resolve_device

USER_DATASET = "user"


@dataclass
class TrainingPair:
    """One (image, labels) pair from the viewer; a stack gives one sample per annotated slice."""

    image: Any
    labels: Any
    modality: str
    name: str
    rgb: bool = False


@dataclass
class FinetuneSettings:
    epochs: int = 5
    steps_per_epoch: int | None = 10
    img_size: int = 256
    lr: float = 1e-4
    batch_size: int = 2
    device: str = "auto"
    #: checkpoint to start from (None = train from scratch)
    init: str | None = None
    #: "default" or "tiny" (architecture when starting from scratch)
    model_preset: str = "default"
    #: keep the shared DC-Encoder backbone fixed (only with ``init``): the modality controllers
    #: and the heads adapt, the pretrained features stay (and each step is ~1.7x cheaper on a CPU)
    freeze_backbone: bool = True
    #: also keep the QM-Decoder and its stride-2 stage fixed (with ``freeze_backbone``): the
    #: controllers, the SP-Generator and the modality head adapt. Measured on the bundled v1.2
    #: (benchmarks/finetune_improvement.py, 2 x 6 steps at 512²): held-out Dice after fine-tuning
    #: vessels 71.0 -> 70.6 (decoder trainable: 65.9), H&E nuclei 72.7 -> 72.7 (70.6), breast
    #: ultrasound of an unseen source 67.2 -> 53.0 (53.2): never worse, so it is the default
    freeze_decoder: bool = True
    num_workers: int = 0
    #: large microscopy and fundus layers train on the tiles tiled inference will cut from them,
    #: at its scale (``pair_samples``); False: every layer resized whole to ``img_size``
    tiles: bool = True
    extra_args: list[str] = field(default_factory=list)


def _safe(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")
    return (cleaned or "layer")[:40]


def pair_samples(pair: TrainingPair, tile_size: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(sample id, image plane, mask plane bool) for a pair; ``ValueError`` naming the mismatch.

    A stack contributes its slices that have any label (unlabelled slices are usually
    "not annotated yet", not "nothing here"); a 2D pair is always used. With ``tile_size`` (the
    training image size, which becomes the model's input size), a plane that tiled inference
    would cut into tiles (``tiling.training_tiles``: large microscopy and fundus images) gives
    those tiles, at the scale the model will see them, instead of itself resized whole.
    """
    image = np.asarray(pair.image)
    labels = np.asarray(pair.labels)
    spatial = image.shape[:-1] if pair.rgb else image.shape
    if labels.shape != tuple(spatial):
        raise ValueError(
            f"pair '{pair.name}': labels shape {labels.shape} does not match the image's {tuple(spatial)}"
        )
    if pair.modality not in MODALITIES:
        raise ValueError(f"pair '{pair.name}': unknown modality {pair.modality!r}")
    if image.dtype.kind not in "biuf":
        raise ValueError(f"pair '{pair.name}': image dtype {image.dtype} cannot be used for training")
    base = _safe(pair.name)
    if len(spatial) == 2:
        return _tiled(base, image, labels > 0, pair.modality, tile_size)
    if len(spatial) != 3:
        raise ValueError(f"pair '{pair.name}': images with shape {image.shape} are not supported (2D or a stack)")
    out = []
    for z in range(labels.shape[0]):
        if np.any(labels[z]):
            out += _tiled(f"{base}_z{z:04d}", image[z], labels[z] > 0, pair.modality, tile_size)
    if not out:
        raise ValueError(f"pair '{pair.name}': no slice of the labels layer has any label")
    return out


def _tiled(sample_id: str, plane: np.ndarray, mask: np.ndarray, modality: str,
           tile_size: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The plane as one sample, or its inference tiles (``_t000``, ``_t001``, ... in row order)."""
    from ..tiling import training_tiles

    tiles = training_tiles(plane, mask, modality, int(tile_size)) if tile_size else None
    if tiles is None:
        return [(sample_id, plane, mask)]
    return [(f"{sample_id}_t{k:03d}", tile.image, tile.mask) for k, tile in enumerate(tiles)]


def tiled_layers(pairs: Sequence[TrainingPair], tile_size: int | None) -> list[str]:
    """Names of the pairs whose planes ``pair_samples`` writes as inference tiles (by shape alone)."""
    if not tile_size:
        return []
    from ..tiling import auto_tiles

    out = []
    for pair in pairs:
        shape = np.shape(pair.labels)
        if len(shape) >= 2 and auto_tiles(pair.modality, (int(shape[-2]), int(shape[-1])), int(tile_size)):
            out.append(pair.name)
    return out


def _image_for_file(plane: np.ndarray) -> tuple[np.ndarray, str]:
    """uint8 -> PNG as is; bool -> 0/255 PNG; other dtypes -> TIFF keeping their values."""
    if plane.dtype == bool:
        return plane.astype(np.uint8) * 255, ".png"
    if plane.dtype == np.uint8:
        return plane, ".png"
    return plane, ".tif"


def write_dataset(pairs: Sequence[TrainingPair], root: str | os.PathLike[str],
                  tile_size: int | None = None) -> dict[str, int]:
    """Write every pair into ``root`` in the dataset layout (large microscopy and fundus planes
    as their inference tiles when ``tile_size`` is given: ``pair_samples``); returns samples per
    modality."""
    import tifffile
    from PIL import Image

    from ..atomic_files import atomic_write

    root = Path(root)
    counts: dict[str, int] = {}
    used: set[str] = set()
    for index, pair in enumerate(pairs):
        for sample_id, plane, mask in pair_samples(pair, tile_size):
            sid = f"p{index:02d}_{sample_id}"
            while sid in used:
                sid += "x"
            used.add(sid)
            base = root / pair.modality / USER_DATASET
            (base / "images").mkdir(parents=True, exist_ok=True)
            (base / "masks").mkdir(parents=True, exist_ok=True)
            arr, ext = _image_for_file(np.asarray(plane))
            if ext == ".png":
                atomic_write(base / "images" / f"{sid}.png", lambda t, a=arr: Image.fromarray(a).save(t, format="PNG"))
            else:
                atomic_write(base / "images" / f"{sid}.tif", lambda t, a=arr: tifffile.imwrite(t, a))
            m = mask.astype(np.uint8) * 255
            atomic_write(base / "masks" / f"{sid}.png", lambda t, a=m: Image.fromarray(a).save(t, format="PNG"))
            counts[pair.modality] = counts.get(pair.modality, 0) + 1
    return counts


def link_folder_dataset(folder: str | os.PathLike[str], root: str | os.PathLike[str]) -> dict[str, int]:
    """Make a user's dataset-layout folder part of ``root`` (symlinks; copies where links fail).

    Returns images per modality found. ``ValueError`` when the folder is not in the layout.
    """
    import shutil

    src = Path(folder).expanduser()
    if not src.is_dir():
        raise ValueError(f"training folder {src} does not exist")
    root = Path(root)
    counts: dict[str, int] = {}
    for mod_dir in sorted(p for p in src.iterdir() if p.is_dir() and p.name in MODALITIES):
        for ds_dir in sorted(p for p in mod_dir.iterdir() if (p / "images").is_dir() and (p / "masks").is_dir()):
            name = ds_dir.name if ds_dir.name != USER_DATASET else f"{USER_DATASET}-folder"
            dest = root / mod_dir.name / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                dest.symlink_to(ds_dir.resolve(), target_is_directory=True)
            except OSError:
                shutil.copytree(ds_dir, dest)
            counts[mod_dir.name] = counts.get(mod_dir.name, 0) + sum(1 for _ in (ds_dir / "images").iterdir())
    if not counts:
        raise ValueError(
            f"{src} is not in the dataset layout: expected <modality>/<dataset>/images and masks folders "
            f"(modality one of {', '.join(MODALITIES)})"
        )
    return counts


def tile_size_for(settings: FinetuneSettings) -> int | None:
    """The training image size, which becomes the fine-tuned model's input size, and so its tile
    size (``pair_samples``); None when layers train whole (``tiles`` off, or the trainer picks
    the size: 0, the starting model's own)."""
    return int(settings.img_size) if settings.tiles and settings.img_size and settings.img_size > 0 else None


def _trains_on_cpu(device: str) -> bool:
    try:
        return resolve_device(device).type == "cpu"
    except ValueError:  # an unusable device: the child reports it
        return False


def build_train_command(settings: FinetuneSettings, data_root: str | os.PathLike[str],
                        out_dir: str | os.PathLike[str]) -> list[str]:
    """The child process's command line: ``python -m napari_delightsam.cli train ... --progress-jsonl``."""
    cmd = [
        sys.executable, "-m", "napari_delightsam.cli", "train",
        "--data", str(data_root),
        "--out", str(out_dir),
        "--epochs", str(int(settings.epochs)),
        "--img-size", str(int(settings.img_size)),
        "--lr", repr(float(settings.lr)),
        "--batch-size", str(int(settings.batch_size)),
        "--device", settings.device,
        "--num-workers", str(int(settings.num_workers)),
        "--progress-jsonl",
    ]
    if settings.steps_per_epoch:
        cmd += ["--steps-per-epoch", str(int(settings.steps_per_epoch))]
    if _trains_on_cpu(settings.device) and cpu_supports_bf16():
        cmd += ["--amp-cpu"]  # bf16 autocast: about 2x per step on CPUs with native bf16
    if settings.init:
        cmd += ["--init", str(settings.init)]
        if settings.freeze_backbone:
            cmd += ["--freeze", "backbone", *(("decoder", "fine_upscale", "refiners") if settings.freeze_decoder else ())]
    elif settings.model_preset != "default":
        cmd += ["--model-preset", settings.model_preset]
    return cmd + list(settings.extra_args)


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """One stdout line -> event dict, or None for anything that is not a JSON object."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


_RUNNING: weakref.WeakSet[TrainingProcess] = weakref.WeakSet()


class TrainingProcess:
    """A running ``delightsam train`` child: stream its events, stop it cleanly."""

    def __init__(self, cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 log_path: str | os.PathLike[str] | None = None, nice: int = 5) -> None:
        self.cmd = list(cmd)
        #: the child's scheduling penalty: training is background work, the GUI comes first
        self.nice = nice
        self.env = env
        self.cwd = cwd
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[str] | None = None
        self.stop_requested = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> TrainingProcess:
        env = {**os.environ, **(self.env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        # OpenMP threads that yield instead of spinning: on a busy machine (napari's own threads)
        # spinning made a CPU training step ~4x slower here (25 s vs 6 s per step)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
            if self.nice > 0:
                kwargs["creationflags"] |= subprocess.BELOW_NORMAL_PRIORITY_CLASS  # type: ignore[attr-defined]
        self.proc = subprocess.Popen(  # noqa: S603 -- our own interpreter and module
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", bufsize=1, env=env, cwd=self.cwd, **kwargs,
        )
        if self.nice > 0 and hasattr(os, "setpriority"):
            # set right after exec, before torch starts its worker threads (they inherit it)
            try:
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.nice))
            except OSError:
                pass
        _RUNNING.add(self)
        out = threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines), daemon=True)
        err = threading.Thread(target=self._pump_stderr, args=(self.proc.stderr,), daemon=True)
        self._threads = [out, err]
        out.start()
        err.start()
        return self

    @staticmethod
    def _pump(stream: Any, sink: queue.Queue[str | None]) -> None:
        try:
            for line in stream:
                sink.put(line)
        except (OSError, ValueError):
            pass
        finally:
            sink.put(None)

    def _pump_stderr(self, stream: Any) -> None:
        log = None
        try:
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
            for line in stream:
                self._stderr.append(line)
                del self._stderr[:-200]
                if log is not None:
                    log.write(line)
                    log.flush()
        except (OSError, ValueError):
            pass
        finally:
            if log is not None:
                log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stderr_tail(self, n: int = 15) -> str:
        return "".join(self._stderr[-n:]).strip()

    def events(self, poll_s: float = 0.1) -> Iterator[dict[str, Any] | None]:
        """Parsed events until the child's stdout closes; ``None`` every ``poll_s`` without one.

        The ``None`` heartbeats let a napari generator worker check its abort flag.
        """
        while True:
            try:
                line = self._lines.get(timeout=poll_s)
            except queue.Empty:
                yield None
                continue
            if line is None:
                break
            event = parse_progress_line(line)
            if event is not None:
                yield event
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def stop(self, grace_s: float = 60.0, wait: bool = False) -> None:
        """Ask the child to stop: SIGINT (clean end, best checkpoint kept), later terminate/kill.

        Returns at once unless ``wait``; a watchdog thread escalates after ``grace_s``.
        """
        self.stop_requested = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            if sys.platform == "win32":
                proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            else:
                proc.send_signal(signal.SIGINT)
        except OSError:
            return

        def escalate() -> None:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()

        if wait:
            escalate()
        else:
            threading.Thread(target=escalate, daemon=True).start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def stop_all(grace_s: float = 5.0) -> None:
    """Stop every running child (at interpreter exit: no orphaned training processes)."""
    for job in list(_RUNNING):
        try:
            job.stop(grace_s=grace_s, wait=True)
        except Exception:  # noqa: BLE001
            job.kill()


import atexit  # noqa: E402

atexit.register(stop_all)


def run_finetune(
    pairs: Sequence[TrainingPair],
    folder: str | os.PathLike[str] | None,
    settings: FinetuneSettings,
    out_dir: str | os.PathLike[str],
    holder: dict[str, Any],
    tmp_parent: str | None = None,
) -> Iterator[dict[str, Any] | None]:
    """Generator body of the fine-tune worker: data -> child process -> events.

    Yields event dicts (plus ``None`` heartbeats); returns a summary dict
    (``returncode``, ``end`` event, ``stopped``, ``stderr``, ``out_dir``). ``holder["job"]`` is
    set to the :class:`TrainingProcess` so the GUI can stop it. The temporary dataset folder
    is removed at the end, whatever happens.
    """
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="delightsam-finetune-", dir=tmp_parent))
    holder["tmp"] = tmp
    try:
        yield {"event": "status", "message": "writing the training pairs to a temporary dataset folder…"}
        counts: dict[str, int] = {}
        if pairs:
            counts = write_dataset(pairs, tmp, tile_size=tile_size_for(settings))
        if folder:
            for mod, n in link_folder_dataset(folder, tmp).items():
                counts[mod] = counts.get(mod, 0) + n
        if not counts:
            raise ValueError("no training data: add (image, labels) pairs or choose a folder")
        yield {"event": "data", "counts": counts, "root": str(tmp),
               "tiled": tiled_layers(pairs, tile_size_for(settings))}
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = build_train_command(settings, tmp, out)
        yield {"event": "status", "message": "starting: " + " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}
        job = TrainingProcess(cmd, log_path=out.parent / f"{out.name}.train.log").start()
        holder["job"] = job
        if holder.get("stop"):
            job.stop()
        end: dict[str, Any] | None = None
        error: str | None = None
        for event in job.events():
            if event is not None and event.get("event") == "end":
                end = event
            elif event is not None and event.get("event") == "error":
                error = str(event.get("message", ""))
            yield event
        return {
            "returncode": job.returncode,
            "end": end,
            "error": error,
            "stopped": job.stop_requested,
            "stderr": job.stderr_tail(),
            "out_dir": str(out),
            "counts": counts,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
