"""The process pool's Ctrl-C paths, without processes."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from normlab.experiments import runner
from normlab.experiments.config import RunConfig


class _InterruptedPool:
    """A pool whose every run ends as a worker's KeyboardInterrupt: Ctrl-C reached the workers
    before the parent noticed its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.shut = False

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_exception(KeyboardInterrupt())
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self.shut = True


def test_a_worker_interrupted_first_is_an_interruption_not_a_failed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "ProcessPoolExecutor", _InterruptedPool)
    failed: list[Any] = []
    configs = [RunConfig(data="digits", steps=2, seed=s) for s in range(3)]
    with pytest.raises(runner.Interrupted):
        runner.execute(
            configs, tmp_path, workers=2, on_done=lambda cfg, result, *_: failed.append(result)
        )
    assert failed == []  # no run was reported as failed
