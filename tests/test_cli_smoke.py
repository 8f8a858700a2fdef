"""`delightsam` entry points: every subcommand's --help, the console script, `python -m`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from napari_delightsam import __version__
from napari_delightsam.cli import COMMANDS, main


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: delightsam")
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: delightsam {command}")
    assert "--" in out  # documents at least one option


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"delightsam {__version__}"


def _console_script() -> str | None:
    # the venv's bin folder first: pytest may run as .venv/bin/python without an activated PATH
    candidate = Path(sys.executable).parent / "delightsam"
    if candidate.is_file():
        return str(candidate)
    return shutil.which("delightsam")


def test_console_script_is_installed_and_runs():
    script = _console_script()
    assert script is not None, "the `delightsam` console script is not installed (pip install -e .)"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: delightsam" in proc.stdout
    assert "benchmark" in proc.stdout


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "napari_delightsam.cli", "info", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: delightsam info")
