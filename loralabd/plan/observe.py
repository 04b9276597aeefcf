"""Memory measured from outside the program's own counters: what the OS or the GPU driver says a process holds.

The plan predicts this quantity (plan/memory.py), and calibration measures the part no allocation list shows —
interpreter and libraries, device context, pipelines, allocator pools — as the difference (plan/calibrate.py).

- CPU (numpy engine, and software WebGPU adapters whose buffers are host memory): the process's resident set.
  Its peak is VmHWM in /proc/<pid>/status (Linux), which writing "5" to /proc/<pid>/clear_refs resets to the
  current resident set, so a phase (one calibration shape, one job) is measured alone; elsewhere ru_maxrss of
  this process (not resettable: the peak since it started).
- NVIDIA: the process's used GPU memory, from NVML (pynvml, when installed) or
  `nvidia-smi --query-compute-apps=pid,used_memory`, else the process table of plain `nvidia-smi` (Vulkan
  processes are listed as graphics apps there), else the GPUs' memory.used (the whole GPU, said so: in a
  container whose pids the driver does not see, on a GPU nothing else uses). The
  driver has no peak counter: a PeakProbe samples it every 50 ms and keeps the largest reading.
- Anything else (Metal, AMD, Intel): wgpu-py does not expose Metal's currentAllocatedSize or
  VK_EXT_memory_budget, so nothing is measured there and the plan says so in its warnings.

Nothing here imports the rest of LoRA Lab: the daemon, calibration and benchmarks/validate_plan.py use it alike.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass

SAMPLE_S = 0.05  # NVIDIA sampling period

RSS = "rss"  # the quantity measured: the process's resident set
NVIDIA = "nvidia"  # the process's used memory on an NVIDIA GPU


@dataclass(frozen=True)
class Reading:
    bytes: int | None  # None: nothing could be measured
    source: str  # how it was measured, for people (and for the plan's notes)


# -- CPU: the resident set ------------------------------------------------------------------------------

def _status(pid: int | None) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def rss_bytes(pid: int | None = None) -> int | None:
    """The process's resident set now (None where /proc does not say)."""
    return _status(pid).get("VmRSS")


def peak_rss_bytes(pid: int | None = None) -> int | None:
    """The process's peak resident set: VmHWM, else (this process only) ru_maxrss."""
    hwm = _status(pid).get("VmHWM")
    if hwm is not None or pid not in (None, os.getpid()):
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)  # bytes on macOS, KiB on Linux


def reset_peak_rss(pid: int | None = None) -> bool:
    """Reset VmHWM to the current resident set (Linux: "5" into clear_refs); False where that is not possible."""
    try:
        with open(f"/proc/{pid or 'self'}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- NVIDIA: the process's used memory --------------------------------------------------------------------

def _nvml_process_bytes(pid: int) -> int | None:
    try:
        import pynvml  # optional: nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        total, seen = 0, False
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            for fn in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    procs = fn(h)
                except Exception:
                    continue
                for p in procs:
                    if p.pid == pid and p.usedGpuMemory is not None:
                        total, seen = total + int(p.usedGpuMemory), True
        return total if seen else None
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _smi(*args: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        p = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def parse_compute_apps(out: str, pid: int) -> int | None:
    """MiB of `pid` in `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` output."""
    total, seen = 0, False
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit() and int(parts[0]) == pid and parts[1].isdigit():
            total, seen = total + int(parts[1]) * 2**20, True
    return total if seen else None


_TABLE_ROW = re.compile(r"^\|\s*\d+\s+\S+\s+\S+\s+(\d+)\s+\S+\s+.*?(\d+)MiB\s*\|\s*$")


def parse_process_table(out: str, pid: int) -> int | None:
    """Bytes of `pid` in the Processes table of plain `nvidia-smi` (compute and graphics apps alike)."""
    total, seen = 0, False
    for line in out.splitlines():
        m = _TABLE_ROW.match(line.strip())
        if m and int(m.group(1)) == pid:
            total, seen = total + int(m.group(2)) * 2**20, True
    return total if seen else None


def nvidia_device_used() -> int | None:
    """memory.used of every NVIDIA GPU together (the fallback when the process is not listed by pid)."""
    out = _smi("--query-gpu=memory.used", "--format=csv,noheader,nounits")
    if not out:
        return None
    try:
        return sum(int(x) for x in out.split()) * 2**20
    except ValueError:
        return None


def nvidia_process_bytes(pid: int | None = None) -> Reading:
    """The process's used GPU memory on NVIDIA GPUs, by the first source that lists it."""
    pid = pid or os.getpid()
    b = _nvml_process_bytes(pid)
    if b is not None:
        return Reading(b, "NVML process used memory")
    out = _smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    b = parse_compute_apps(out, pid) if out else None
    if b is not None:
        return Reading(b, "nvidia-smi --query-compute-apps used_memory")
    out = _smi()
    b = parse_process_table(out, pid) if out else None
    if b is not None:
        return Reading(b, "nvidia-smi process table")
    b = nvidia_device_used()  # a container whose pids the driver does not see: the whole GPU, said so
    return Reading(b, "nvidia-smi memory.used of the whole GPU (this process is not listed by pid)" if b else "")


# -- which quantity measures a device ---------------------------------------------------------------------

def quantity_for(backend: str, vendor: str = "", name: str = "", software: bool = False) -> str | None:
    """RSS for the CPU and software adapters, NVIDIA where the driver lists processes, None where nothing can
    be measured from outside (the plan then warns that the driver's own memory is not counted)."""
    if backend == "numpy" or software:
        return RSS
    if ("nvidia" in f"{vendor} {name}".lower() or str(vendor).lower() in ("0x10de", "4318")) \
            and (shutil.which("nvidia-smi") or _has_pynvml()):
        return NVIDIA
    return None


def _has_pynvml() -> bool:
    import importlib.util

    return importlib.util.find_spec("pynvml") is not None


def describe_quantity(quantity: str | None) -> str:
    return {RSS: "the process's peak resident set (VmHWM)", NVIDIA: "the process's used GPU memory (NVIDIA driver)",
            None: "nothing: this device's driver memory cannot be read"}[quantity]


def current(quantity: str | None, pid: int | None = None) -> Reading:
    """What the process holds now in that quantity."""
    if quantity == RSS:
        return Reading(rss_bytes(pid), "VmRSS")
    if quantity == NVIDIA:
        return nvidia_process_bytes(pid)
    return Reading(None, "")


class PeakProbe:
    """The peak of one phase (a calibration shape, a model load, a job) for a process:

        probe = PeakProbe(RSS, pid).start(); ...; reading = probe.stop()

    RSS: VmHWM after resetting it at start (where it cannot be reset, the process's peak so far, said so);
    NVIDIA: the largest of readings every SAMPLE_S seconds on a thread, and one at start and stop."""

    def __init__(self, quantity: str | None, pid: int | None = None, period: float = SAMPLE_S):
        self.quantity, self.pid, self.period = quantity, pid, period
        self.peak: int | None = None
        self.source = ""
        self._reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _take(self) -> None:
        r = current(self.quantity, self.pid)
        if r.bytes is not None:
            self.peak = r.bytes if self.peak is None else max(self.peak, r.bytes)
            self.source = r.source

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._take()

    def start(self) -> "PeakProbe":
        if self.quantity == RSS:
            self._reset = reset_peak_rss(self.pid)
        elif self.quantity == NVIDIA:
            self._take()
            self._thread = threading.Thread(target=self._loop, name="peak-probe", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> Reading:
        if self.quantity == RSS:
            b = peak_rss_bytes(self.pid)
            how = "VmHWM (reset at the start)" if self._reset else "peak resident set since the process started"
            return Reading(b, how if b is not None else "")
        if self.quantity == NVIDIA:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._take()
            return Reading(self.peak, f"{self.source}, sampled every {self.period * 1e3:.0f} ms" if self.peak else "")
        return Reading(None, "")

