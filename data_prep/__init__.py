"""Training-data preparation: sources -> filtered, deduplicated, decontaminated table + manifest.

Stage: `python -m data_prep.build` (see data_prep/README.md). The RL loop reads the output with
`data_prep.load_train(path)`.
"""

from data_prep.table import load_train

__all__ = ["load_train"]
