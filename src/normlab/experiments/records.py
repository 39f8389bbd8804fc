"""Run records: the only contract between running studies and reporting them.

One JSON file per run, ``<out>/runs/<run_id>.json``, written atomically (a temporary file renamed
into place), so a killed process leaves either the old file or the new one, never half of one.

Schema (``"schema": "normlab.run"``, ``"version": 1``)::

    {
      "schema": "normlab.run", "version": 1,
      "normlab": "0.1.0", "torch": "2.13.0+cpu",
      "config": {...RunConfig fields...},
      "status": "complete" | "diverged",   # diverged: a non-finite loss stopped training
      "steps_done": int, "seconds": float, "parameters": int,
      "train_loss": [float | null, ...],     # one per step done (null: non-finite)
      "evals": [{"step", "test_loss", "test_acc", "val_acc"}, ...],   # eval mode, EMA statistics
      "probes": [{"step", "loss", "grad_norm", "step_sizes", "losses", "grad_changes",
                  "loss_range", "grad_pred_range", "beta"}, ...],     # Santurkar et al.
      "final": {"test_acc_ema", "test_loss_ema", "test_acc_exact", "test_loss_exact",
                "exact_stats": bool, "train_acc", "train_loss",   # eval mode, running statistics
                "ema_momenta": {"<momentum>": test_acc, ...}} | null,
      "activations": {"start": [{"name", "kind", "mean", "variance"}, ...], "end": [...]} | null
    }

Accuracies are fractions in [0, 1]; ``test_acc_exact`` is measured after
``recompute_population_stats`` when ``exact_stats`` is true. It is false -- and the "exact" values
equal the EMA ones -- for models without running statistics, for diverged runs, and for the norms
whose running estimates ``recompute_population_stats`` does not recompute yet (L1/L-inf batch
norm's dispersion, weight norm's mean-only batch norm).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from normlab._checks import fail
from normlab.experiments.config import RunConfig

__all__ = ["SCHEMA", "VERSION", "RunRecord", "load_records", "read_record", "write_json_atomic"]

SCHEMA = "normlab.run"
VERSION = 1

RunRecord = dict[str, Any]
_REQUIRED = ("config", "status", "steps_done", "seconds", "train_loss", "evals", "probes", "final")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(data), f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_record(path: Path) -> RunRecord:
    """Read and check one record.

    Raises:
        ValueError: not JSON, not a normlab run record, a newer schema version, or missing fields
            -- the message names the file.
    """
    owner = "read_record"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        fail(
            ValueError,
            owner,
            f"the file {path}",
            "a readable JSON run record",
            f"an unreadable or corrupt file ({error})",
            "delete it and rerun the study to rewrite it",
        )
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        fail(
            ValueError,
            owner,
            f"the file {path}",
            f'a record with "schema": {SCHEMA!r}',
            "a foreign JSON file",
            "keep only normlab records in the runs/ directory",
        )
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        fail(
            ValueError,
            owner,
            f"the record version of {path}",
            f"<= {VERSION}",
            repr(data.get("version")),
            "upgrade normlab to read it",
        )
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        fail(
            ValueError,
            owner,
            f"the record {path}",
            f"to have the fields {list(_REQUIRED)}",
            f"missing {missing}",
            "delete it and rerun the study to rewrite it",
        )
    data["config"] = RunConfig.from_dict(data["config"])
    return data


def load_records(directory: Path) -> list[RunRecord]:
    """All records under ``directory/runs`` (sorted by file name).

    Raises:
        FileNotFoundError: no ``runs`` directory or no record in it.
        ValueError: a corrupt or foreign file (see :func:`read_record`).
    """
    runs = Path(directory) / "runs"
    files = sorted(runs.glob("*.json")) if runs.is_dir() else []
    if not files:
        fail(
            FileNotFoundError,
            "load_records",
            f"the directory {runs}",
            "one or more run records",
            "none",
            "run a study first: normlab study run NAME --out DIR",
        )
    return [read_record(f) for f in files]
