"""`python -m plots.all` end to end, and its refusal of a directory that holds no runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from plots_fixtures import tiny_cfg, write_run

from plots.all import main, make_all

REPO = Path(__file__).resolve().parents[2]


def test_empty_dir_fails_clearly(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("hi")
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no runs in" in err and "config.json" in err and "['notes.txt']" in err
    with pytest.raises(ValueError, match="no runs in"):
        make_all(tmp_path / "runs", tmp_path / "out")
    assert main(["--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, tiny_cfg("sft-multi-gspo", algorithm="gspo", mini_steps=8), {0: 0.3, 5: 0.35}, last_step=5)
    proc = subprocess.run(
        [sys.executable, "-m", "plots.all", "--runs", str(runs), "--out", str(tmp_path / "out"), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # 3 figures x (png, pdf) + 1 table x (md, tex, csv) + index.md
    assert "wrote 10 files" in proc.stdout
    assert (tmp_path / "out" / "index.md").exists()
