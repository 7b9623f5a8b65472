"""`python -m experiments.demo` end to end on the micro zoo: 2 cells x 2 steps in 2 processes."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_end_to_end_micro(micro_zoo, tmp_path):
    from experiments import demo

    out = tmp_path / "demo"
    s = demo.main(["--out", str(out), "--zoo-dir", str(micro_zoo), "--zoo-size", "micro", "--steps", "2",
                   "--cells", "sft-single-grpo-r3,sft-multi-gspo", "--jobs", "2", "--static-prompts", "16"])
    assert set(s["cells"]) == {"sft-single-grpo-r3", "sft-multi-gspo"}
    assert set(s["static_by_precision"]) == {"bf16", "fp8"}
    assert s["static"] == s["static_by_precision"]["fp8"]
    c = s["cells"]["sft-multi-gspo"]
    got = (c["algorithm"], c["replay"], c["mini_steps"], c["rollout_precision"], c["steps"])
    assert got == ("gspo", False, 8, "fp8", 2)
    assert json.loads((out / "summary.json").read_text()) == s
    assert "sft-single-grpo-r3" in (out / "summary.md").read_text()
    for cell in s["cells"]:
        assert (out / cell / "manifest.json").exists()
