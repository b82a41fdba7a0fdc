"""``CSVLogger``: Lightning's CSV logger, but a resumed run keeps its metrics.csv.

Lightning's writer deletes metrics.csv whenever the version folder is not empty, so resuming a run in its own
folder (``pgolf fit --ckpt_path last``) truncated the history. This writer keeps the file and appends to it; on
resume ``GolfModule`` drops the rows logged after the checkpoint's step (they belong to the abandoned run), so
the file reads as one uninterrupted run.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from pgolf_lit.fileio import atomic_path


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # keep an existing metrics.csv: it is the run's own history
        return None

    def keep_steps_before(self, step: int) -> None:
        """Drop the rows logged at ``step`` or later (Lightning's CSV step counts from 0)."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], [r for r in reader if int(r.get("step") or 0) < step]
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = list(fields)


class CSVLogger(LightningCSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
