"""What we run on: the WebGPU adapter (name, type, backend, limits, features) or the CPU (cores, RAM, BLAS),
and how much memory a training run may use there — told by the platform where it tells it, else a stated
estimate the user can override (LORALAB_DEVICE_MEMORY, or memory_cap_bytes in the plan).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field, asdict

GiB = 1 << 30

# A discrete GPU that does not say how much memory it has: assume a small laptop card.
UNKNOWN_GPU_MEMORY = 4 * GiB
# Of the memory an integrated GPU shares with the CPU, the share a run may take (Apple's Metal reports
# recommendedMaxWorkingSetSize at about 2/3-3/4 of RAM; we stay below that).
SHARED_MEMORY_FRACTION = 0.6


@dataclass
class Device:
    backend: str  # "numpy" | "webgpu"
    name: str
    type: str  # "cpu" | "discrete-gpu" | "integrated-gpu" | "software" | ...
    api: str = ""  # Vulkan / Metal / D3D12 / OpenGL for WebGPU; "" for numpy
    vendor: str = ""
    driver: str = ""
    cores: int = 0
    blas: str = ""
    blas_threads: int = 0
    memory_bytes: int | None = None  # what a run may use
    memory_source: str = ""  # where memory_bytes came from
    limits: dict = field(default_factory=dict)  # WebGPU limits (bytes / counts)
    features: list = field(default_factory=list)
    software: bool = False  # a CPU pretending to be a GPU (lavapipe, SwiftShader, WARP)

    def key(self) -> str:
        """What calibration results are cached under: the same adapter + driver + thread count."""
        return "|".join([self.backend, self.name, self.api, self.driver, str(self.cores), str(self.blas_threads)])

    def to_dict(self) -> dict:
        return asdict(self)


# -- CPU ----------------------------------------------------------------------------------------------

def meminfo() -> dict:
    """/proc/meminfo in bytes ({} where there is none)."""
    out = {}
    try:
        for line in open("/proc/meminfo"):
            k, v = line.split(":", 1)
            parts = v.split()
            out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def cgroup_limit() -> int | None:
    """A container's memory limit (cgroup v2 or v1), when there is one."""
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            s = open(p).read().strip()
        except OSError:
            continue
        if s.isdigit() and int(s) < (1 << 60):
            return int(s)
    return None


def system_memory() -> tuple[int | None, str]:
    """(bytes available to a new allocation, where the number came from)."""
    mi = meminfo()
    avail, src = mi.get("MemAvailable"), "/proc/meminfo MemAvailable"
    if avail is None:
        try:
            avail, src = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "sysconf free pages"
        except (ValueError, OSError, AttributeError):
            avail, src = None, ""
    lim = cgroup_limit()
    if lim is not None and (avail is None or lim < avail):
        avail, src = lim, "cgroup memory limit"
    return avail, src


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info() -> tuple[str, int]:
    """numpy's BLAS library and the threads it will use (env vars are what OpenBLAS/MKL read at start)."""
    import numpy as np

    name = ""
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg.get("Build Dependencies", {}).get("blas", {})
        name = f"{b.get('name', '')} {b.get('version', '')}".strip()
    except Exception:  # older numpy prints instead of returning
        pass
    threads = 0
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            threads = int(os.environ[var])
            break
    return name, threads or cpu_count()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe_cpu() -> Device:
    mem, src = system_memory()
    blas, threads = blas_info()
    return Device(backend="numpy", name=cpu_name(), type="cpu", cores=cpu_count(), blas=blas,
                  blas_threads=threads, memory_bytes=mem, memory_source=src)


# -- WebGPU -------------------------------------------------------------------------------------------

SOFTWARE_NAMES = ("llvmpipe", "lavapipe", "swiftshader", "warp", "microsoft basic render")


def gpu_memory(vendor: str, name: str, adapter_type: str) -> tuple[int | None, str]:
    """Device memory where the platform tells it: nvidia-smi, amdgpu sysfs; shared memory for CPU and
    integrated adapters; else None (the caller states an estimate)."""
    t = adapter_type.lower()
    if "cpu" in t or any(s in name.lower() for s in SOFTWARE_NAMES):
        mem, src = system_memory()
        return mem, f"system memory ({src}); the adapter runs on the CPU"
    if "integrated" in t:
        mem, src = system_memory()
        if mem is not None:
            return int(mem * SHARED_MEMORY_FRACTION), f"{SHARED_MEMORY_FRACTION:.0%} of system memory ({src}), shared with the GPU"
    if "nvidia" in (vendor + name).lower() and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout.split("\n")[0]
            free, _total = (int(x) for x in out.split(","))
            return free * 2**20, "nvidia-smi memory.free"
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    for card in sorted(_glob("/sys/class/drm/card*/device/mem_info_vram_total")):
        try:
            total = int(open(card).read())
            used = int(open(card.replace("total", "used")).read())
            return total - used, f"{card} (amdgpu)"
        except (OSError, ValueError):
            continue
    return None, ""


def _glob(pattern):
    import glob

    return glob.glob(pattern)


def describe_webgpu(desc: dict | None = None) -> Device:
    """The adapter the WebGPU engine uses, from engine.select.adapter_description() (opens the process's
    runtime when not given)."""
    if desc is None:
        from ..engine.select import adapter_description

        desc = adapter_description()
    name = desc.get("name") or "unknown adapter"
    vendor = str(desc.get("vendor", ""))
    atype = str(desc.get("type", "")).lower().replace("_", "-")
    software = "cpu" in atype or any(s in name.lower() for s in SOFTWARE_NAMES)
    mem, src = gpu_memory(vendor, name, atype)
    return Device(backend="webgpu", name=name, type="software" if software else (atype or "unknown"),
                  api=str(desc.get("api", "")), vendor=vendor, driver=str(desc.get("driver", "")),
                  cores=cpu_count() if software else 0, memory_bytes=mem, memory_source=src,
                  limits=dict(desc.get("limits", {})), features=list(desc.get("features", [])), software=software)


def describe(engine_or_backend) -> Device:
    """Device of an engine (its .backend) or of a backend name ("numpy" | "webgpu"); WebGPU engines share the
    process's one adapter."""
    backend = engine_or_backend if isinstance(engine_or_backend, str) else engine_or_backend.backend
    if backend == "webgpu":
        return describe_webgpu()
    if backend != "numpy":
        raise ValueError(f"unknown backend {backend!r}; use 'numpy' or 'webgpu'")
    return describe_cpu()


def memory_override() -> int | None:
    """LORALAB_DEVICE_MEMORY: bytes, or with a unit (e.g. 6GiB, 8GB, 512MiB)."""
    s = os.environ.get("LORALAB_DEVICE_MEMORY", "").strip()
    return parse_bytes(s) if s else None


def parse_bytes(s: str) -> int:
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 2**20,
             "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
    t = s.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units or not num:
        raise ValueError(f"cannot read {s!r} as a memory size; write bytes or e.g. 6GiB, 8GB, 512MiB")
    return int(float(num) * units[unit])
