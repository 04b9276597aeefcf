"""The WebGPU runtime: one device per process, WGSL loading, pipeline/bind-group caches, buffers, programs.

A *program* is a list of recorded dispatches (pipeline + bind group + workgroup counts) built once per
shape and replayed: encoding a step is then a loop of set_pipeline/set_bind_group/dispatch calls in one
compute pass, one submit, and at most one small read back. Every failure names the kernel.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Hashable, overload

import numpy as np

import loralabd


def _shader_dir():
    """The WGSL kernels: the top-level shaders/ folder, installed as the package loralabd.shaders (pyproject.toml
    maps it) by a wheel and by `pip install -e .` alike. Only a checkout imported without any install (or one
    installed before that mapping) falls back to reading its shaders/ folder directly."""
    try:
        return resources.files("loralabd.shaders")
    except ModuleNotFoundError:
        return Path(loralabd.__file__).parent.parent / "shaders"


SHADER_DIR = _shader_dir()
OPTIONAL_FEATURES = ("shader-f16", "subgroup", "timestamp-query")
# Bytes of queued buffer writes before they are submitted and waited for: wgpu copies every write into a
# staging buffer that lives until the next submit completes, so loading a model in one go held a second copy
# of every weight on the device (2.4x the resident size on a 3B model). In chunks, loading peaks at
# resident + UPLOAD_CHUNK (webgpu/sizing.py plans the same bound).
UPLOAD_CHUNK = 64 << 20


class WebGPUError(RuntimeError):
    """A WebGPU call failed; the message names the kernel and says what to try."""


class NoAdapterError(WebGPUError):
    pass


# --- WGSL loading: a minimal template step --------------------------------------------------------
# `//#include file.wgsl`, `//#if NAME` / `//#else` / `//#endif` (NAME set in defines), `{{KEY}}` substitution.

_BINDING = re.compile(r"@group\(0\)\s*@binding\((\d+)\)\s*var(?:<([\w, ]+)>)?\s+(\w+)\s*:")
_STRUCT_P = re.compile(r"struct\s+P\s*\{([^}]*)\}", re.S)


def render_wgsl(filename: str, defines: dict) -> str:
    path = SHADER_DIR / filename
    if not path.is_file():
        raise WebGPUError(f"shader {filename} is missing (looked in {SHADER_DIR}, the package loralabd.shaders): "
                          "reinstall LoRA Lab with its shaders: `pip install -e .` in a checkout, or a wheel built by "
                          "`python -m build` (docs/install.md)")
    out: list[str] = []
    stack: list[bool] = []  # one entry per open //#if: whether its branch is taken
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s.startswith("//#include"):
            if all(stack):
                out.append(render_wgsl(s.split()[1], defines))
            continue
        if s.startswith("//#if"):
            name = s.split()[1]
            stack.append(bool(defines.get(name)))
            continue
        if s.startswith("//#else"):
            stack[-1] = not stack[-1]
            continue
        if s.startswith("//#endif"):
            stack.pop()
            continue
        if all(stack):
            out.append(line)
    src = "\n".join(out)
    for k, v in defines.items():
        src = src.replace("{{" + k + "}}", str(v))
    if "{{" in src:
        raise WebGPUError(f"{filename}: template key {src[src.index('{{'):].split('}}')[0]}}}}} has no value")
    return src


def parse_bindings(src: str) -> dict[str, tuple[int, str]]:
    """name -> (binding index, "uniform" | "read" | "rw")."""
    out = {}
    for idx, kind, name in _BINDING.findall(src):
        k = "uniform" if kind.startswith("uniform") else ("rw" if "read_write" in kind else "read")
        out[name] = (int(idx), k)
    return out


def parse_params(src: str) -> list[tuple[str, str]]:
    """Fields of `struct P` (all 4-byte scalars): [(name, "u32" | "i32" | "f32")]."""
    m = _STRUCT_P.search(src)
    if not m:
        return []
    fields = []
    for part in m.group(1).split(","):
        part = part.strip()
        if part:
            n, t = (x.strip() for x in part.split(":"))
            fields.append((n, t))
    return fields


# --- buffers ---------------------------------------------------------------------------------------

@dataclass(eq=False)
class Buf:
    """A GPU buffer of `nbytes` (f32 / i32 / u32 elements)."""

    buffer: Any  # wgpu.GPUBuffer (wgpu ships no types); None once freed
    nbytes: int
    name: str = ""
    offset: int = 0  # bytes; a view into a larger buffer when > 0 (aligned to 256)

    @property
    def n(self) -> int:
        return self.nbytes // 4


def view(buf: Buf, offset: int, nbytes: int, name: str = "") -> Buf:
    """A sub-range of buf for binding (offset must be a multiple of 256 bytes)."""
    if offset % 256 or offset + nbytes > buf.nbytes:
        raise WebGPUError(f"view {name!r} [{offset}, +{nbytes}) of {buf.name!r} is misaligned or out of range")
    return Buf(buf.buffer, nbytes, name or buf.name, buf.offset + offset)


@dataclass
class Copy:
    """A buffer-to-buffer copy between dispatches of a program (offsets may change between runs)."""

    src: Buf
    src_off: int
    dst: Buf
    dst_off: int
    nbytes: int


class PendingRead:
    """A read back in flight: result() waits for the submit that wrote it, then returns the bytes."""

    def __init__(self, rt, staging, nbytes, promise):
        self.rt, self.staging, self.nbytes, self.promise = rt, staging, nbytes, promise

    def result(self) -> np.ndarray:
        try:
            self.promise.sync_wait()
            out = np.frombuffer(self.staging.read_mapped(0, self.nbytes, copy=True), np.uint8).copy()
        finally:
            if self.staging.map_state == "mapped":
                self.staging.unmap()
        return out


@dataclass
class Op:
    kernel: str  # "file:entry[variant]" — used in errors and in timestamp profiles
    pipeline: object
    bind_group: object
    grid: tuple[int, int, int]
    keep: list = field(default_factory=list)  # uniform buffers owned by this op
    raw: tuple = ()  # (pipeline handle, bind group handle, x, y, z) for the native encoder (_native_encoder)


def _native_encoder():
    """wgpu-native's C entry points for the three calls a dispatch makes, without wgpu-py's per-call Python
    wrapper (error capture, a cffi array for dynamic offsets): ~1 µs a dispatch instead of ~8, which is
    what bounds decoding. Encoding errors still surface, at finish/submit (wgpu defers them there).
    None when the backend is not wgpu-native."""
    try:
        from wgpu.backends.wgpu_native._ffi import ffi, lib

        return (lib.wgpuComputePassEncoderSetPipeline, lib.wgpuComputePassEncoderSetBindGroup,
                lib.wgpuComputePassEncoderDispatchWorkgroups, ffi.NULL)
    except Exception:  # another backend: the portable path
        return None


_NATIVE = None if os.environ.get("LORALAB_WGPU_NATIVE_ENCODE") == "0" else _native_encoder()


def _headless_device_select() -> None:
    """Mesa's Vulkan device-select layer connects to the display server to find the GPU that drives the screen; a
    daemon without a display has none, and libwayland then prints `error: XDG_RUNTIME_DIR is invalid or not set in
    the environment.` to stderr, twice. wgpu picks its adapter by power preference itself, so the layer is switched
    off (NODEVICE_SELECT, its own switch) when no display is there; a value the user set wins."""
    if not os.environ.get("WAYLAND_DISPLAY") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("NODEVICE_SELECT", "1")


class Runtime:
    """Adapter, device, caches. Use `get_runtime()`; one per process (wgpu-py leaks on re-creation)."""

    def __init__(self):
        _headless_device_select()  # before wgpu creates its Vulkan instance
        import wgpu

        self.wgpu = wgpu
        pref = os.environ.get("LORALAB_WGPU_POWER", "high-performance")
        adapter = wgpu.gpu.request_adapter_sync(power_preference=pref)
        if adapter is None:
            raise NoAdapterError("no WebGPU adapter found; install a GPU driver with Vulkan/Metal/D3D12 "
                                 "or Mesa's lavapipe (`apt-get install mesa-vulkan-drivers`), or use --backend numpy")
        self.adapter = adapter
        self.features = tuple(f for f in OPTIONAL_FEATURES if f in adapter.features)
        al = adapter.limits
        want = {k: al[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                   "max-storage-buffers-per-shader-stage", "max-compute-workgroup-storage-size",
                                   "max-compute-invocations-per-workgroup") if k in al}
        try:
            self.device = adapter.request_device_sync(required_features=list(self.features), required_limits=want)
        except Exception as e:  # some drivers refuse raised limits: retry with defaults
            try:
                self.device = adapter.request_device_sync(required_features=list(self.features))
            except Exception:
                raise WebGPUError(f"could not create a WebGPU device on {adapter.info.get('device')}: {e}") from e
        self.limits = dict(self.device.limits)
        self.align = int(self.limits.get("min-storage-buffer-offset-alignment", 256))
        self._modules: dict = {}
        self._pipelines: dict = {}
        self._dummy = None
        self._dummy_rw = None
        self._staging: dict = {}
        self._staged = 0  # bytes written since the last submit (their staging copies are still held)
        self.live_bytes = 0
        self.peak_bytes = 0
        self.lock = threading.RLock()  # the device is owned by one thread at a time
        # workgroup-memory tiled matmuls pay off on real GPUs, not on lavapipe (LORALAB_WGPU_TILED=0/1 forces)
        env = os.environ.get("LORALAB_WGPU_TILED")
        self.tiled = self.is_hardware if env is None else env == "1"

    # -- what we run on ------------------------------------------------------------------------------

    def info(self) -> dict:
        i = self.adapter.info
        return {
            "name": i.get("device", ""), "vendor": i.get("vendor", ""), "backend": i.get("backend_type", ""),
            "type": i.get("adapter_type", ""), "description": i.get("description", ""),
            "features_used": list(self.features),
            "limits": {k: self.limits[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                                   "max-compute-workgroup-storage-size",
                                                   "max-compute-invocations-per-workgroup") if k in self.limits},
        }

    def description(self) -> dict:
        """The adapter as the planner describes it (engine.select.adapter_description): name, vendor, type, api,
        driver, every integer limit of the device, the adapter's features, and the kernel variants in use."""
        i = self.adapter.info
        return {"name": str(i.get("device", "")), "vendor": str(i.get("vendor", "")),
                "type": str(i.get("adapter_type", "")), "api": str(i.get("backend_type", "")),
                "driver": str(i.get("description", "")),
                "limits": {k: int(v) for k, v in dict(self.limits).items() if isinstance(v, int)},
                "features": sorted(str(f) for f in self.adapter.features), "tiled": bool(self.tiled),
                "upload_chunk": UPLOAD_CHUNK}

    @property
    def is_hardware(self) -> bool:
        from ..select import is_hardware

        return is_hardware(self.adapter.info.get("adapter_type", ""))

    # -- buffers ---------------------------------------------------------------------------------------

    def buffer(self, nbytes: int, name: str = "", data: np.ndarray | None = None, readable=False) -> Buf:
        wgpu = self.wgpu
        nbytes = max(16, (int(nbytes) + 15) // 16 * 16)
        mx = self.limits.get("max-storage-buffer-binding-size", 1 << 27)
        if nbytes > mx:
            raise WebGPUError(f"buffer {name!r} needs {nbytes / 2**20:.1f} MiB, above this adapter's storage "
                              f"binding limit of {mx / 2**20:.0f} MiB; use a smaller batch or sequence length")
        usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC
        try:
            b = self.device.create_buffer(size=nbytes, usage=usage, label=name)
        except Exception as e:
            raise WebGPUError(f"allocating buffer {name!r} ({nbytes} bytes) failed: {e}") from e
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        buf = Buf(b, nbytes, name)
        if data is not None:
            self.write(buf, data)
        return buf

    def view(self, buf: Buf, offset: int, nbytes: int, name: str = "") -> Buf:
        return view(buf, offset, nbytes, name)

    def free(self, buf: Buf):
        if buf is not None and buf.buffer is not None and buf.offset == 0:
            buf.buffer.destroy()
            buf.buffer = None
            self.live_bytes -= buf.nbytes

    def write(self, buf: Buf, data, offset: int = 0):
        a = np.ascontiguousarray(data)
        raw = a.view(np.uint8).reshape(-1)
        if raw.nbytes % 4:
            raw = np.concatenate([raw, np.zeros(4 - raw.nbytes % 4, np.uint8)])
        if offset + raw.nbytes > buf.nbytes:
            raise WebGPUError(f"write of {raw.nbytes} bytes into buffer {buf.name!r} ({buf.nbytes} bytes) overflows")
        queue = self.device.queue
        for start in range(0, raw.nbytes, UPLOAD_CHUNK):  # at most UPLOAD_CHUNK of staging held at a time
            piece = raw[start:start + UPLOAD_CHUNK]
            if self._staged and self._staged + piece.nbytes > UPLOAD_CHUNK:
                self.flush_writes()
            queue.write_buffer(buf.buffer, buf.offset + offset + start, piece)
            self._staged += piece.nbytes

    def flush_writes(self):
        """Submit the queued writes and wait for them: wgpu frees their staging copies once that submit is done."""
        if self._staged:
            with self.lock:  # a 4-byte read back waits for everything queued before it (wgpu-py 0.32's
                self.sync()      # on_submitted_work_done_sync fails on wgpu-native's newer callback type)
                self._staged = 0

    @property
    def dummy_rw(self) -> Buf:  # unused outputs of a multi-entry shader (never also bound read-only)
        if self._dummy_rw is None:
            self._dummy_rw = self.buffer(64, "dummy_rw", np.zeros(16, np.float32))
        return self._dummy_rw

    @property
    def dummy(self) -> Buf:
        if self._dummy is None:
            self._dummy = self.buffer(64, "dummy", np.zeros(16, np.float32))
        return self._dummy

    # -- kernels ---------------------------------------------------------------------------------------

    def _kernel(self, file: str, entry: str, defines: dict, overrides: dict | None = None):
        overrides = dict(overrides or {})
        key = (file, entry, tuple(sorted(defines.items())), tuple(sorted(overrides.items())))
        hit = self._pipelines.get(key)
        if hit is not None:
            return hit
        name = f"{file}:{entry}{_variant({**defines, **overrides})}"
        src = render_wgsl(file, defines)
        mkey = (file, tuple(sorted(defines.items())))
        wgpu = self.wgpu
        try:
            if mkey not in self._modules:
                self._modules[mkey] = self.device.create_shader_module(code=src, label=file)
            module = self._modules[mkey]
        except Exception as e:
            raise WebGPUError(f"kernel {name}: WGSL did not compile: {e}") from e
        binds = parse_bindings(src)
        types = {"uniform": wgpu.BufferBindingType.uniform, "read": wgpu.BufferBindingType.read_only_storage,
                 "rw": wgpu.BufferBindingType.storage}
        try:
            layout = self.device.create_bind_group_layout(entries=[
                {"binding": i, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": types[k]}}
                for i, k in sorted(binds.values())])
            pl = self.device.create_pipeline_layout(bind_group_layouts=[layout])
            stage = {"module": module, "entry_point": entry}
            if overrides:  # WGSL `override` constants (pipeline-creation time: sizes of workgroup arrays, lanes)
                stage["constants"] = overrides
            pipe = self.device.create_compute_pipeline(layout=pl, compute=stage, label=name)
        except Exception as e:
            raise WebGPUError(f"kernel {name}: pipeline creation failed: {e}") from e
        hit = (name, pipe, layout, binds, parse_params(src))
        self._pipelines[key] = hit
        return hit

    def forget_compiled(self) -> None:
        """Compile shader modules and pipelines anew on next use (what a new process pays, the driver's cache warm)."""
        self._modules.clear()
        self._pipelines.clear()

    def op(self, file: str, entry: str, grid, buffers: dict, params: dict | None = None, defines=None,
           overrides=None) -> Op:
        """Record one dispatch. buffers: binding name -> Buf; params: fields of the shader's `struct P`;
        defines: template step (text); overrides: WGSL `override` constants (pipeline creation)."""
        defines = dict(defines or {})
        name, pipe, layout, binds, pfields = self._kernel(file, entry, defines, overrides)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        mx = self.limits.get("max-compute-workgroups-per-dimension", 65535)
        if min(grid) < 1 or max(grid) > mx:
            raise WebGPUError(f"kernel {name}: workgroup grid {grid} is outside 1..{mx}; the input is too large "
                              "for one dispatch — use a smaller batch or sequence length")
        keep, entries = [], []
        for bname, (idx, kind) in binds.items():
            if kind == "uniform":
                given = params or {}
                missing = [f for f, _ in pfields if f not in given]
                extra = set(given) - {f for f, _ in pfields}
                if missing or extra:
                    raise WebGPUError(f"kernel {name}: parameters missing {missing} / unknown {sorted(extra)}")
                raw = b"".join(struct.pack("<" + {"u32": "I", "i32": "i", "f32": "f"}[t], given[f])
                               for f, t in pfields)
                raw += b"\0" * (-len(raw) % 16 or (16 if not raw else 0))
                ub = self.device.create_buffer_with_data(data=raw, usage=self.wgpu.BufferUsage.UNIFORM)
                keep.append(ub)
                entries.append({"binding": idx, "resource": {"buffer": ub, "offset": 0, "size": len(raw)}})
                continue
            b = buffers.get(bname)
            if b is None:
                b = self.dummy_rw if kind == "rw" else self.dummy
            if b.buffer is None:
                raise WebGPUError(f"kernel {name}: buffer {b.name!r} was freed")
            entries.append({"binding": idx, "resource": {"buffer": b.buffer, "offset": b.offset, "size": b.nbytes}})
        try:
            bg = self.device.create_bind_group(layout=layout, entries=entries, label=name)
        except Exception as e:
            raise WebGPUError(f"kernel {name}: bind group creation failed: {e}") from e
        return Op(name, pipe, bg, grid, keep, (getattr(pipe, "_internal", None), getattr(bg, "_internal", None)) + grid)

    # -- running ---------------------------------------------------------------------------------------

    def reserve_staging(self, nbytes: int, slots) -> None:
        """Make the staging buffers of these read slots now (a train session's per-step metric reads), so that
        steady-state reads create nothing."""
        for slot in slots:
            self._staging_buffer((nbytes + 3) // 4 * 4, slot)

    def free_staging(self, slots) -> None:
        """Destroy the staging buffers of these slots (any size); their reads must be done."""
        slots = set(slots)
        for key in [k for k in self._staging if k[1] in slots]:
            self._staging.pop(key).destroy()

    def _staging_buffer(self, nbytes: int, slot):
        """A MAP_READ buffer per (size, slot), made once: steady-state reads create nothing."""
        key = (nbytes, slot)
        b = self._staging.get(key)
        if b is None:
            wgpu = self.wgpu
            b = self._staging[key] = self.device.create_buffer(
                size=nbytes, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST, label=f"staging{slot}")
        return b

    @overload
    def submit(self, ops: list, read: Buf, read_bytes: int | None = None, read_offset: int = 0,
               label: str = "step", slot: Hashable = 0) -> PendingRead: ...

    @overload
    def submit(self, ops: list, read: None = None, read_bytes: int | None = None, read_offset: int = 0,
               label: str = "step", slot: Hashable = 0) -> None: ...

    @overload
    def submit(self, ops: list, read: Buf | None = None, read_bytes: int | None = None, read_offset: int = 0,
               label: str = "step", slot: Hashable = 0) -> PendingRead | None: ...

    def submit(self, ops: list, read: Buf | None = None, read_bytes: int | None = None, read_offset: int = 0,
               label: str = "step", slot: Hashable = 0) -> "PendingRead | None":
        """Encode ops (dispatches and copies) in order, submit once; with `read`, start copying `read_bytes`
        of it back and return a PendingRead (its result() waits for this submit only). A slot's staging
        buffer serves one read at a time: overlapping reads use different slots."""
        with self.lock:
            enc = self.device.create_command_encoder(label=label)
            cp, current = None, None
            native = _NATIVE
            for o in ops:
                try:
                    if isinstance(o, Copy):
                        if cp is not None:
                            cp.end()
                            cp, current = None, None
                        enc.copy_buffer_to_buffer(o.src.buffer, o.src.offset + o.src_off, o.dst.buffer,
                                                  o.dst.offset + o.dst_off, o.nbytes)
                        continue
                    if cp is None:
                        cp = enc.begin_compute_pass(label=label)
                        handle = getattr(cp, "_internal", None)
                    if native is not None and handle is not None and o.raw and o.raw[0] is not None:
                        pipe, bg, x, y, z = o.raw
                        if pipe is not current:
                            native[0](handle, pipe)
                            current = pipe
                        native[1](handle, 0, bg, 0, native[3])
                        native[2](handle, x, y, z)
                        continue
                    if o.pipeline is not current:
                        cp.set_pipeline(o.pipeline)
                        current = o.pipeline
                    cp.set_bind_group(0, o.bind_group)
                    cp.dispatch_workgroups(*o.grid)
                except Exception as e:
                    raise WebGPUError(f"kernel {getattr(o, 'kernel', 'copy')}: dispatch failed in {label}: {e}") from e
            staging, nb = None, 0
            try:
                if cp is not None:
                    cp.end()
                if read is not None:
                    nb = (read_bytes or read.nbytes + 3) // 4 * 4
                    staging = self._staging_buffer(nb, slot)
                    enc.copy_buffer_to_buffer(read.buffer, read.offset + read_offset, staging, 0, nb)
                self.device.queue.submit([enc.finish()])
                self._staged = 0  # the writes before it went with this submit
            except Exception as e:
                names = sorted({o.kernel for o in ops if isinstance(o, Op)})
                raise WebGPUError(f"{label} failed at submit (kernels {', '.join(names)}): {e}") from e
            if staging is None:
                return None
            return PendingRead(self, staging, nb, staging.map_async(self.wgpu.MapMode.READ, 0, nb))

    @overload
    def run(self, ops: list, read: Buf, read_bytes: int | None = None, read_offset: int = 0,
            label: str = "step") -> np.ndarray: ...

    @overload
    def run(self, ops: list, read: None = None, read_bytes: int | None = None, read_offset: int = 0,
            label: str = "step") -> None: ...

    @overload
    def run(self, ops: list, read: Buf | None = None, read_bytes: int | None = None, read_offset: int = 0,
            label: str = "step") -> np.ndarray | None: ...

    def run(self, ops: list, read: Buf | None = None, read_bytes: int | None = None, read_offset: int = 0,
            label: str = "step") -> np.ndarray | None:
        """Encode ops in order, submit once, optionally wait for and return `read_bytes` of `read`."""
        pending = self.submit(ops, read, read_bytes, read_offset, label)
        return None if pending is None else pending.result()

    def read(self, buf: Buf, dtype=np.float32, count: int | None = None, offset_elems: int = 0) -> np.ndarray:
        nb = (count if count is not None else buf.n - offset_elems) * 4
        raw = self.run([], read=buf, read_bytes=nb, read_offset=offset_elems * 4, label=f"read {buf.name}")
        return raw.view(dtype)[: nb // 4]

    def sync(self):
        self.read(self.dummy, count=1)

    def profile(self, ops: list, repeats: int = 1) -> dict:
        """Per-kernel GPU time (seconds, summed over its dispatches) from timestamp queries, each op in its
        own compute pass (so the total is a little above the fused step). {} without timestamp-query."""
        if "timestamp-query" not in self.features:
            return {}
        wgpu = self.wgpu
        total: dict = {}
        chunk = 1024  # a query set holds at most 4096 timestamps
        with self.lock:
            qs = self.device.create_query_set(type=wgpu.QueryType.timestamp, count=2 * chunk)
            res = self.device.create_buffer(size=16 * chunk, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
            rd = self.device.create_buffer(size=16 * chunk, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
            for _ in range(repeats):
                for c0 in range(0, len(ops), chunk):
                    part = ops[c0:c0 + chunk]
                    n = len(part)
                    enc = self.device.create_command_encoder()
                    for i, o in enumerate(part):
                        cp = enc.begin_compute_pass(timestamp_writes={
                            "query_set": qs, "beginning_of_pass_write_index": 2 * i, "end_of_pass_write_index": 2 * i + 1})
                        cp.set_pipeline(o.pipeline)
                        cp.set_bind_group(0, o.bind_group)
                        cp.dispatch_workgroups(*o.grid)
                        cp.end()
                    enc.resolve_query_set(qs, 0, 2 * n, res, 0)
                    enc.copy_buffer_to_buffer(res, 0, rd, 0, 16 * n)
                    self.device.queue.submit([enc.finish()])
                    rd.map_sync(wgpu.MapMode.READ, 0, 16 * n)
                    t = np.frombuffer(rd.read_mapped(0, 16 * n, copy=True), np.uint64).reshape(n, 2).astype(np.float64)
                    rd.unmap()
                    for o, (a, b) in zip(part, t):  # wgpu reports nanoseconds (period 1 on Vulkan/NVIDIA/lavapipe)
                        total[o.kernel] = total.get(o.kernel, 0.0) + max(b - a, 0.0) * 1e-9 / repeats
            qs.destroy()
            res.destroy()
            rd.destroy()
        return total


def _variant(defines: dict) -> str:
    v = ",".join(f"{k}={v}" for k, v in sorted(defines.items()))
    return f"[{v}]" if v else ""


_RUNTIME: Runtime | None = None
_LOCK = threading.Lock()


def get_runtime() -> Runtime:
    """The process-wide runtime (created on first use)."""
    global _RUNTIME
    with _LOCK:
        if _RUNTIME is None:
            _RUNTIME = Runtime()
        return _RUNTIME


def available() -> bool:
    """Whether a WebGPU adapter can be had (without raising)."""
    try:
        get_runtime()
        return True
    except Exception:
        return False


def grid1d(n: int, wg: int) -> tuple[int, int]:
    """Workgroup counts (x, y) covering n invocations of size-wg groups within the 65535-per-dimension limit;
    kernels linearise with i = gid.x + gid.y * num_workgroups.x * wg."""
    g = max(1, -(-n // wg))
    if g <= 65535:
        return (g, 1)
    gx = 65535
    return (gx, -(-g // gx))
