#!/usr/bin/env bash
# Everything a GPU machine can prove, in one run (issue 12): the real-GPU suite (which also starts
# the server with the embedded NVML provider, both bridges) and `make bench` in both bridges, on
# that machine's own Python. For a machine without our venv: the wheels of the packages it lacks
# are carried in .whl/ (see docs/BENCHMARKS.md, "On a GPU machine"); results go to $OUT (or
# ./gpu-check-out).
#   NVML_DRIVER_ROOT=/usr/local/nvidia bash scripts/gpu-machine-check.sh
# BRIDGES="guest" benches one arrangement only (the GPU suite always covers both), for a lease
# too short for two.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu-check-out}
mkdir -p "$out"
root=${NVML_DRIVER_ROOT:-/run/nvidia/driver}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/src:/tmp/site
fi
export PYTHONUNBUFFERED=1
log=$out/run.log
status=0
{ python3 --version; nvidia-smi -L; nproc; } 2>&1 | tee "$log"
echo "== real-GPU suite (make gpu-test) ==" | tee -a "$log"
if command -v make >/dev/null; then
  make --no-print-directory gpu-test PY=python3 NVML_DRIVER_ROOT="$root" PYTEST_ADDOPTS="-s -rA"
else  # the same command as the Makefile's
  DEVICE_API_NVML_DRIVER_ROOT=$root python3 -m pytest -q -m gpu -p no:cacheprovider -s -rA tests/gpu
fi 2>&1 | tee -a "$log" || status=1
for bridge in ${BRIDGES:-guest trio-asyncio}; do
  echo "== make bench (bench.run, then upstream's workload), --bridge $bridge ==" | tee -a "$log"
  timeout 330 python3 -m bench.run --bridge "$bridge" 2>&1 | tee -a "$log" || status=1
  cp bench/results/bench-latest.json "$out/bench-$bridge.json" 2>/dev/null
  timeout 150 python3 -m bench.upstream --bridge "$bridge" 2>&1 | tee -a "$log" || status=1
  cp bench/results/upstream-latest.json "$out/upstream-$bridge.json" 2>/dev/null
done
exit $status
