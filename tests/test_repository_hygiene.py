"""The repository speaks only of the product.

No tracked text file names an internal working step of its authors (``stop 25``, ``this
sitting``), and none holds an absolute path of the machine it was made on (a run folder under a
home or scratch directory, the checkout's own path): results record commands with paths
relative to the repository and ``../shared/data``.

One narrow exception: the scripts that run on a lent GPU machine (``SCRATCH_ON_DEVICE``) write
their scratch folders under ``/tmp/`` *there*; those paths are where the scripts work, not a
record of where something ran. Only ``/tmp/`` is allowed in them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()

STEP_LABEL = re.compile(r"stops? [0-9]+|\bsitting\b", re.IGNORECASE)
MACHINE_PATH = re.compile(r"/(tmp|home|root|mnt|srv|work)/")
SCRATCH_ON_DEVICE = frozenset(
    {
        "scripts/device/run_recipe.sh",
        "scripts/device/train_leg.sh",
        "scripts/device/ship.py",
        "scripts/device/unpack.py",
    }
)


def tracked_text_files(root: Path) -> list[tuple[str, str]]:
    """(path relative to ``root``, text) of every tracked regular file that is UTF-8 text."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    files = []
    for rel in out.decode("utf-8").split("\0"):
        path = root / rel
        if not rel or path.is_symlink() or not path.is_file():
            continue
        raw = path.read_bytes()
        if b"\0" in raw[:8192]:
            continue  # binary (images, weights)
        try:
            files.append((rel, raw.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return files


def problems(rel: str, text: str) -> list[str]:
    """``path:line: what`` for each step label or machine path in one file's text."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in STEP_LABEL.finditer(line):
            found.append(f"{rel}:{number}: working-step label {match.group(0)!r}")
        for match in MACHINE_PATH.finditer(line):
            if rel in SCRATCH_ON_DEVICE and match.group(0) == "/tmp/":
                continue
            found.append(f"{rel}:{number}: machine path {line[match.start():match.start() + 40]!r}")
    return found


def scan(root: Path, skip: frozenset[str] = frozenset()) -> list[str]:
    return [p for rel, text in tracked_text_files(root) if rel not in skip for p in problems(rel, text)]


def _git_checkout() -> bool:
    return shutil.which("git") is not None and (REPO / ".git").exists()


@pytest.mark.skipif(not _git_checkout(), reason="not a git checkout")
def test_tracked_text_speaks_only_of_the_product():
    found = scan(REPO, skip=frozenset({THIS}))
    assert not found, (
        "tracked files name internal working steps or machine paths (write what the product does; "
        "record paths relative to the repository, ../shared/data, runs/... or $TMPDIR/...):\n"
        + "\n".join(found[:50])
    )


def test_the_check_finds_planted_labels_and_paths():
    assert problems("docs/x.md", "as in stop 25's run") and problems("x.json", '"note": "Stops 25-26"')
    assert problems("README.md", "made in this Sitting") and problems("a.py", "# see the sitting of 2026")
    for path in ("/work/runs/v1/best.safetensors", "/tmp/run3/x", "/home/u/data", "/root/x", "/mnt/d/", "/srv/a/"):
        assert problems("benchmarks/results/r.json", f'"checkpoint": "{path}"'), path
    # the device scripts' scratch folders (only /tmp/, only there)
    assert not problems("scripts/device/run_recipe.sh", "LOGS=/tmp/delightsam-logs")
    assert problems("scripts/device/README.md", "RUN=/tmp/x") and problems("scripts/device/run_recipe.sh", "/work/x/")
    # what is not a step label or a machine path
    assert not problems("a.md", "the loop stops after a stage; stopped at 5; ../shared/data; runs/v1; $TMPDIR/x; /tmp")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_planted_file_in_a_checkout_fails_the_scan(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "clean.md").write_text("Paths: ../shared/data and runs/v1.\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0/work/runs/x stop 3")
    (tmp_path / "notes.md").write_text("Measured in stop 27's run.\n")
    (tmp_path / "result.json").write_text('{"checkpoint": "/work/runs/v1/best.safetensors"}\n')
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    found = scan(tmp_path)
    assert [f.split(":")[0] for f in found] == ["notes.md", "result.json"]
