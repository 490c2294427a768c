"""Helpers shared by the CPU benchmark and its subprocesses (standard library and torch only).

Kept free of timm, open_clip and captum imports so that the subprocesses that run in the
reference venv (``scripts/reference_env.sh``) can import it as well.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Prefix of the one line a subprocess prints with its JSON result.
RESULT_PREFIX = "RESULT "


def call_subprocess(cmd: Sequence[str], timeout: float) -> Tuple[Optional[Dict[str, Any]], str]:
    """Run ``cmd`` offline; its :data:`RESULT_PREFIX` line as a dict (or None) and a short
    error text (a timeout, or the exit code and the last line it printed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :]), ""
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, f"exit {proc.returncode}: {tail[0][:200]}"


def explainable(model: Any, x: Any, spec: Any = None) -> Any:
    """What a sweep explains of ``model``: the model itself, or for a feature model (which
    ``LeGrad(model)`` refuses) ``FeatureDirection`` with identity rows, the embedding's
    dimensions as targets. (Imports captum_legrad only when called.)"""
    import torch

    from captum_legrad import FeatureDirection, discover

    spec = discover(model) if spec is None else spec
    if not spec.scores_are_features:
        return model
    with torch.no_grad():
        dim = FeatureDirection(model, torch.eye(1), spec=spec).embed(x).shape[-1]
    return FeatureDirection(model, torch.eye(dim), spec=spec)


def ensure_repo_on_path() -> None:
    """Import ``captum_legrad`` from this checkout, also in the reference venv."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


def round_robin(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
) -> Dict[str, List[float]]:
    """Wall-clock seconds of every callable, alternated round-robin after ``warmup`` calls each.

    Alternating means that drift and load from other processes hit every entry alike, so
    the ratios of the medians are meaningful even on a busy machine.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def flop_counts(fns: Mapping[str, Callable[[], object]]) -> Dict[str, float]:
    """Floating-point operations of one call of each callable (the formulas of
    ``torch.utils.flop_counter``: matmuls, convolutions and attention, forward and backward;
    element-wise ops are not counted).

    Independent of the machine and its load, so the ratios of these counts are the floor the
    timed ratios approach when every callable runs its matmuls at the same rate. A plain
    dispatch mode (not ``FlopCounterMode``, whose module tracker rejects legrad-torch's
    hooked modules).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        total = 0.0

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += float(formula(*args, **kwargs, out_val=out))
            return out

    counts: Dict[str, float] = {}
    for name, fn in fns.items():
        with Counter() as counter:
            fn()
        counts[name] = counter.total
    return counts


def medians(times: Mapping[str, Sequence[float]]) -> Dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_line() -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def today() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def current_rss_mib() -> float:
    """The resident set size now (``VmRSS``), in MiB; falls back to the peak."""
    rss = _status_mib("VmRSS")
    return maxrss_mib() if rss is None else rss


def _status_mib(field: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def maxrss_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB (KiB on Linux, bytes on macOS).

    On Linux this also counts the parent's RSS at ``fork``/``exec`` (the kernel keeps the
    larger of the old and the new address space's peak), so a worker started by a large
    process reads that process's size; :func:`peak_rss_mib` avoids this.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak RSS of this process's own address space (``VmHWM``), else ``ru_maxrss``."""
    peak = _status_mib("VmHWM")
    return maxrss_mib() if peak is None else peak


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def seconds(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def ratio(value: float) -> str:
    return f"{value:.2f}×"
