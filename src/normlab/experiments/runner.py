"""Run many :class:`RunConfig` s: in this process, in a local process pool (default), or on a Ray
cluster -- existing engines, no scheduler of our own. Finished runs are skipped, interrupted ones
resume from their checkpoints, so running the same command again completes what is missing.

The study manifest ``<out>/studies.json`` records which studies (with which options) an output
directory holds, so that ``normlab report DIR`` can re-render without retraining::

    {"schema": "normlab.studies", "version": 1,
     "studies": {"<name>": {"quick": bool, "data": str | null, "seeds": int | null,
                            "steps": int | null}, ...}}
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from normlab._checks import check_choice, check_positive_int, fail
from normlab.data import Dataset, load_dataset
from normlab.experiments.config import RunConfig
from normlab.experiments.records import RunRecord, write_json_atomic
from normlab.experiments.studies import Options, get_study
from normlab.experiments.trainer import train_run

__all__ = [
    "MANIFEST",
    "Interrupted",
    "check_output_dir",
    "execute",
    "read_manifest",
    "update_manifest",
]

log = logging.getLogger(__name__)

MANIFEST = "studies.json"
OnDone = Callable[[RunConfig, "RunRecord | BaseException", int, int], None]


class Interrupted(Exception):
    """Ctrl-C during :func:`execute`: finished runs are saved, running ones checkpointed."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(
            f"interrupted after {done} of {total} runs; finished runs are saved and running ones "
            "checkpointed -- run the same command again to continue"
        )
        self.done, self.total = done, total


def check_output_dir(out: Path) -> Path:
    """Create ``out`` if needed and make sure it is writable.

    Raises:
        ValueError: ``out`` is a file, or cannot be created or written.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".normlab-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        fail(
            ValueError,
            "normlab",
            f"the output directory {out}",
            "a writable directory",
            f"{type(error).__name__}: {error.strerror or error}",
            "pass --out with a directory you can write to",
        )
    return out


def read_manifest(out: Path) -> dict[str, Options]:
    """Studies recorded in ``out`` (empty if none)."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != "normlab.studies":
            raise ValueError("not a normlab study manifest")
        return {name: Options(**opts) for name, opts in data["studies"].items()}
    except (OSError, ValueError, TypeError, KeyError) as error:
        fail(
            ValueError,
            "read_manifest",
            f"the file {path}",
            "a normlab study manifest",
            f"an unreadable or foreign file ({error})",
            "delete it and run the studies again",
        )


def update_manifest(out: Path, studies: Sequence[str], options: Options) -> None:
    """Add (or replace) ``studies`` with ``options`` in the manifest."""
    current = read_manifest(out)
    for name in studies:
        get_study(name)
        current[name] = options
    write_json_atomic(
        Path(out) / MANIFEST,
        {
            "schema": "normlab.studies",
            "version": 1,
            "studies": {k: asdict(v) for k, v in current.items()},
        },
    )


@lru_cache(maxsize=8)
def _dataset(name: str, standardize: str) -> Dataset:
    return load_dataset(name, standardize=standardize)


_stopping = False  # set in a pool worker by its first SIGINT


def _job(config: dict[str, Any], out: str, checkpoint_seconds: float = 30.0) -> RunRecord:
    if _stopping:  # a queued run reached a worker that was told to stop: do not start it
        raise KeyboardInterrupt
    cfg = RunConfig.from_dict(config)
    return train_run(
        cfg,
        Path(out),
        dataset=_dataset(cfg.data, cfg.standardize),
        checkpoint_seconds=checkpoint_seconds,
    )


def _on_sigint(signum: int, frame: Any) -> None:
    """A pool worker's SIGINT: the first stops the run (its checkpoint is written on the way out);
    later ones -- the terminal's Ctrl-C and the parent's forwarded copy both arrive -- are
    ignored, so they cannot interrupt that write."""
    global _stopping
    if not _stopping:
        _stopping = True
        raise KeyboardInterrupt


def _init_worker() -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, _on_sigint)


def _cost(cfg: RunConfig) -> float:
    """Rough relative cost, to start the longest runs first."""
    per_step = cfg.batch_size * (8.0 if cfg.arch == "vgg" else 1.0) + 200
    return cfg.steps * per_step * (1.2 if cfg.probe_every else 1.0)


def execute(
    configs: Sequence[RunConfig],
    out: Path,
    *,
    workers: int = 2,
    executor: str = "process",
    on_done: OnDone | None = None,
    checkpoint_seconds: float = 30.0,
) -> dict[str, RunRecord]:
    """Run every config (each once: duplicates share a record) and return ``{run_id: record}``.

    ``executor``: ``"process"`` (a local pool of ``workers`` processes, one thread each; with
    ``workers=1`` the runs go in this process), ``"ray"`` (``ray.init()``: a running cluster
    if ``RAY_ADDRESS`` is set, else a local instance with ``workers`` CPUs; ``out`` must be on a
    filesystem the cluster shares). ``on_done(config, record_or_error, done, total)`` is called
    as runs finish; runs checkpoint every ``checkpoint_seconds``. A failing run does not stop
    the others; its error is passed to ``on_done``
    and re-raised at the end.

    Raises:
        Interrupted: Ctrl-C (everything finished so far is kept; rerun to continue).
    """
    check_positive_int(workers, name="workers", owner="execute")
    check_choice(executor, ("process", "ray"), name="executor", owner="execute")
    if not (isinstance(checkpoint_seconds, (int, float)) and checkpoint_seconds >= 0):
        fail(
            ValueError,
            "execute",
            "argument 'checkpoint_seconds' (--checkpoint-every)",
            "a number of seconds >= 0 (0: after every step)",
            repr(checkpoint_seconds),
            "pass e.g. 30",
        )
    unique = list({cfg.run_id: cfg for cfg in configs}.values())
    unique.sort(key=_cost, reverse=True)
    out = check_output_dir(out)
    results: dict[str, RunRecord] = {}
    errors: list[BaseException] = []

    def finished(cfg: RunConfig, result: RunRecord | BaseException) -> None:
        if isinstance(result, BaseException):
            errors.append(result)
            log.error("run %s failed: %s", cfg.run_id, result)
        else:
            results[cfg.run_id] = result
        if on_done is not None:
            on_done(cfg, result, len(results) + len(errors), len(unique))

    try:
        if executor == "ray":
            _execute_ray(unique, out, workers, finished, checkpoint_seconds)
        elif workers == 1 or len(unique) <= 1:
            for cfg in unique:
                try:
                    finished(cfg, _job(cfg.to_dict(), str(out), checkpoint_seconds))
                except Exception as error:
                    finished(cfg, error)
        else:
            _execute_pool(unique, out, workers, finished, checkpoint_seconds)
    except KeyboardInterrupt:
        raise Interrupted(len(results), len(unique)) from None
    if errors:
        raise errors[0]
    return results


def _execute_pool(
    configs: list[RunConfig],
    out: Path,
    workers: int,
    finished: Callable[[RunConfig, Any], None],
    checkpoint_seconds: float,
) -> None:
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker)
    pending: dict[Future[RunRecord], RunConfig] = {}
    try:
        for cfg in configs:
            pending[pool.submit(_job, cfg.to_dict(), str(out), checkpoint_seconds)] = cfg
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                cfg = pending.pop(future)
                error = future.exception()
                if isinstance(error, KeyboardInterrupt):
                    # Ctrl-C reached the worker before this process noticed its own: the same
                    # interruption (not a failed run), handled below
                    raise KeyboardInterrupt
                finished(cfg, error if error is not None else future.result())
    except KeyboardInterrupt:
        # workers in our process group got the same SIGINT; a signal sent to this process only
        # is passed on, so that every running run writes its checkpoint before it stops
        for process in list(getattr(pool, "_processes", {}).values()):
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _execute_ray(
    configs: list[RunConfig],
    out: Path,
    workers: int,
    finished: Callable[[RunConfig, Any], None],
    checkpoint_seconds: float,
) -> None:
    try:
        import ray  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        fail(
            ImportError,
            "normlab study",
            "the executor 'ray'",
            "the ray package installed",
            "no module named 'ray'",
            "pip install 'normlab[ray]' (or use --executor process)",
        )
    started = not ray.is_initialized()
    if started:
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_ray_job)
    pending = {remote.remote(cfg.to_dict(), str(out), checkpoint_seconds): cfg for cfg in configs}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                cfg = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as error:
                    finished(cfg, error)
                    continue
                record["config"] = RunConfig.from_dict(record["config"])
                finished(cfg, record)
    finally:
        for ref in pending:
            ray.cancel(ref)
        if started:
            ray.shutdown()


def _ray_job(config: dict[str, Any], out: str, checkpoint_seconds: float) -> RunRecord:
    torch.set_num_threads(1)
    record = _job(config, out, checkpoint_seconds)
    record["config"] = record["config"].to_dict()  # plain data across the object store
    return record
