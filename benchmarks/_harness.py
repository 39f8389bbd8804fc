"""Shared benchmark plumbing: allocator fix, thread pinning, timing with median and spread.

Not a test: benchmarks print ratios against a peer measured in the same run; nothing here asserts
a time.
"""

from __future__ import annotations

import ctypes
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer


def fix_allocator() -> bool:
    """Stop glibc from serving every >32 MiB tensor with a fresh mmap (page faults on each alloc).

    Without it, any out-of-place op on a large tensor is dominated by first-touch page faults
    (shared/reference/machine-and-data.md, section 3.2). Returns whether the fix was applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold, m_trim_threshold = -3, -1
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
        libc.mallopt(m_trim_threshold, 2**31 - 1)
    )


@dataclass(frozen=True)
class Timing:
    """Median and interquartile range of one statement, in seconds."""

    median: float
    iqr: float
    runs: int

    @property
    def spread(self) -> float:
        """IQR relative to the median."""
        return self.iqr / self.median if self.median else float("nan")


def _timing(times: list[float]) -> Timing:
    times = sorted(times)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return Timing(statistics.median(times), q3 - q1, len(times))


def time_fn(fn: Callable[[], object], min_run_time: float) -> Timing:
    """Time ``fn()`` with torch's Timer (warm-up included, blocked autorange)."""
    fn()  # warm-up: first-call allocations and lazy initialisation
    m = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return _timing(list(m.times))


def compare(
    ours: Callable[[], object], theirs: Callable[[], object], min_run_time: float, rounds: int = 4
) -> tuple[Timing, Timing]:
    """Time two functions in alternating rounds, so that drift of the machine hits both alike."""
    ours()
    theirs()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, bucket in ((ours, times[0]), (theirs, times[1])):
            m = Timer("fn()", globals={"fn": fn}).blocked_autorange(
                min_run_time=min_run_time / rounds
            )
            bucket.extend(m.times)
    return _timing(times[0]), _timing(times[1])


def machine() -> str:
    """One line naming the CPU (with its family, model, vector instruction set and caches: one
    "AMD EPYC" name covers Zen 4 (family 25) and Zen 5 (family 26) hosts, on which the fast
    extra's loops compare differently with torch's kernels), threads and torch build (for the
    table's header)."""
    cpu = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    details = []
    if "cpu family" in fields:
        details.append(f"family {fields['cpu family']} model {fields.get('model', '?')}")
    flags = fields.get("flags", "").split()
    if flags:
        details.append(
            "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        )
    caches = _caches()
    if caches:
        details.append(caches)
    described = f"{cpu} ({', '.join(details)})" if details else cpu
    return f"{described}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def _caches() -> str:
    """CPU 0's data and unified cache sizes from sysfs ("L1d 32K, L2 1024K, L3 32768K"), or ""."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            sizes.append(f"L{level}{'d' if kind == 'Data' else ''} {size}")
    return ", ".join(sizes)


def emit(lines: list[str], out: Path | None) -> int:
    """Print the markdown table (and write it to ``out`` if given); return the exit status 0."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text)
    return 0
