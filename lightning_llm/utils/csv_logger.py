"""``RunCSVLogger``: Lightning's CSV logger for a run that may be resumed into the same directory."""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ContinuingWriter(ExperimentWriter):
    """Keeps the rows already in ``metrics.csv`` that come before the first step this process logs (Lightning's
    writer deletes the file), so a resumed run's file reads as one run: the steps lost to the crash are logged once,
    by the resumed process."""

    def _check_log_dir_exists(self) -> None:
        self._continuing = self._fs.isfile(self.metrics_file_path)

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._continuing and step is not None:
            self._continuing = False
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                earlier = [row for row in csv.DictReader(handle) if int(row["step"]) < step]
            if earlier:
                self.metrics_keys = sorted(set().union(*earlier))
                with self._fs.open(self.metrics_file_path, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
                    writer.writeheader()
                    writer.writerows(earlier)
            else:
                self._fs.rm_file(self.metrics_file_path)
        super().log_metrics(metrics_dict, step)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume into the same directory: the earlier rows before the
    step the resumed run continues from are kept, the later ones (lost with the crash) replaced. Every argument is
    ``CSVLogger``'s."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
