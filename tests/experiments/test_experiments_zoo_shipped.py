"""The shipped tiny zoo: its recipe is the current one, and build_zoo reuses it in seconds."""

from __future__ import annotations

import dataclasses
import json
import time

from experiments import zoo


def test_shipped_zoo_matches_the_current_recipe():
    """If this fails, the tiny recipe (zoo.SIZES['tiny']) or the task changed: rebuild and re-ship
    (`python -m experiments.zoo --rebuild --zoo-dir runs/zoo`, then copy runs/zoo into
    experiments/shipped_zoo/tiny/)."""
    m = json.loads((zoo.SHIPPED / "tiny" / zoo.MANIFEST).read_text())
    assert m["config"] == dataclasses.asdict(zoo.SIZES["tiny"])
    assert zoo.is_complete(zoo.SHIPPED / "tiny", zoo.SIZES["tiny"])
    assert 0.2 < m["models"]["sft"]["heldout_acc_t1"] < 0.6  # the calibrated band of docs/embedded.md


def test_build_zoo_copies_the_shipped_zoo(tmp_path):
    t0 = time.time()
    m = zoo.build_zoo(tmp_path / "zoo", size="tiny")
    assert time.time() - t0 < 30
    assert m == json.loads((zoo.SHIPPED / "tiny" / zoo.MANIFEST).read_text())
    for k in zoo.MODEL_KINDS:
        assert (tmp_path / "zoo" / k / "model.safetensors").read_bytes() == (
            zoo.SHIPPED / "tiny" / k / "model.safetensors"
        ).read_bytes()
