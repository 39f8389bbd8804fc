"""SIGKILL at random moments: a rerun completes, and its records equal an uninterrupted run's.

The study runs in a subprocess that checkpoints after every step (``--checkpoint-every 0``) and
is killed with SIGKILL (no handler runs, no checkpoint is written on the way out) at a seeded
random moment after training got under way -- which may be inside a checkpoint write; then the
same command runs to the end in this process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.cli import main

TRIALS = 10
STUDY = ["study", "run", "bn-training", "--data", "digits", "--seeds", "1", "--steps", "700"]


def _records(out: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    records = {}
    for path in sorted((out / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        record.pop("seconds")  # wall time is the one field allowed to differ
        records[path.name] = record
    return records


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main([*STUDY, "--workers", "1", "--out", str(reference)]) == 0
    rng = random.Random(1234)
    survived = 0
    for _ in range(TRIALS):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "normlab",
                *STUDY,
                "--workers",
                "1",
                "--checkpoint-every",
                "0",
                "--out",
                str(killed),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # wait for training to be under way (a checkpoint appears), then kill at a random moment
        deadline = time.monotonic() + 120
        while (
            proc.poll() is None
            and not list((killed / "checkpoints").glob("*.pt"))
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            survived += 1
        proc.wait(timeout=60)
    assert survived >= TRIALS // 2, "most trials should be killed mid-study"
    partial = list((killed / "checkpoints").glob("*.pt")) + list((killed / "runs").glob("*.json"))
    assert partial, "the killed runs left progress behind"
    assert main([*STUDY, "--workers", "1", "--out", str(killed)]) == 0
    assert _records(killed) == _records(reference)
    assert not list((killed / "checkpoints").glob("*.pt"))
