"""Where every step's metrics go: metrics.jsonl (the source of truth), and optionally TensorBoard
and Weights & Biases, as verl and slime users expect (off by default; RunConfig.log_to).

    sink = MetricsSink(run_dir, cfg)          # opens the optional backends
    sink.log(rec)                             # one global step: appended to metrics.jsonl first
    sink.close()

TensorBoard writes event files under <run_dir>/tensorboard/ (torch.utils.tensorboard; needs the
`tensorboard` package). W&B runs with the run directory as its dir, the cell name as run name and
id (a resumed run continues the same W&B run), the RunConfig as its config; `WANDB_MODE=offline`
works without network (`wandb sync` uploads later). Only numbers are sent; keys keep their
namespaces (`mismatch/k3_kl`), which both tools group into panels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from r3 import rundir

BACKENDS = ("tensorboard", "wandb")


class MetricsSink:
    def __init__(self, run_dir: Path, cfg: Any):
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        if "tensorboard" in cfg.log_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    f"RunConfig.log_to has 'tensorboard' but it cannot be imported ({e}); "
                    "pip install tensorboard, or drop it from log_to"
                ) from None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if "wandb" in cfg.log_to:
            try:
                import wandb
            except ImportError:
                raise ImportError(
                    "RunConfig.log_to has 'wandb' but wandb is not installed; pip install wandb, or drop it from log_to"
                ) from None
            self._wandb = wandb.init(
                project=cfg.wandb_project,
                name=cfg.name,
                id=cfg.name,
                resume="allow",
                dir=str(self.run_dir),
                config=cfg.to_dict(),
                reinit="create_new",
            )

    def log(self, rec: dict[str, Any]) -> None:
        """Append the step's record to metrics.jsonl, then mirror its finite numbers."""
        rundir.append_jsonl(self.run_dir / rundir.METRICS, rec)
        step = int(rec["step"])
        nums = {
            k: float(v)
            for k, v in rec.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v)
        }
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(nums, step=step)

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
