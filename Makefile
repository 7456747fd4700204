# Developer entry points. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
PY := .venv/bin/python
PROTO_DIR := src/deviceapi/proto
PROTOS := $(PROTO_DIR)/device/v1alpha1/gpu.proto $(PROTO_DIR)/device/v1alpha1/provider.proto
# SPEC §7.2: NVSentinel's platform-connector API (package datamodels).
DATAMODELS_PROTOS := $(PROTO_DIR)/datamodels/health_event.proto
NVSENTINEL_PROTOS := $(PROTO_DIR)/nvsentinel/v1alpha1/gpu.proto

# Every Python README names. The whole suite runs on .venv's interpreter ($(PYTHON); 3.11 in CI)
# in both bridges; on each other one, the platform subset below, in both bridges too.
PYTHONS := 3.11 3.12 3.13
# Where versions differ (asyncio's server shutdown, trio-asyncio's patches, signals): every test
# that starts a real server process or talks to one over a real socket (tests/integration), the
# socket and HTTP listener tests, the bridge tests, and the churn test at 1,000 cycles.
PLATFORM_TESTS := tests/integration tests/hostile/test_hostile_socket.py \
	tests/unit/transport/test_ops_http.py tests/unit/test_bridge.py \
	"tests/hostile/test_hostile_churn.py::test_connect_watch_disconnect_churn_leaves_nothing_behind[1000]"
# The real-GPU suite looks for the driver here (the server's --nvml-driver-root).
NVML_DRIVER_ROOT ?= /run/nvidia/driver

.PHONY: proto test test-platforms gpu-test lint run bench bench-fanout bench-upstream chaos tools

# The virtual environment, rebuilt when the dependencies change.
.venv/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,dev]"
	touch $@

# One virtual environment per other Python (.venv-3.12, ...): test extras only.
.venv-%/.installed: pyproject.toml
	@py=$$(scripts/find-python.sh $*) && { test -x .venv-$*/bin/python || $$py -m venv .venv-$*; }
	.venv-$*/bin/python -m pip install -q --upgrade pip
	.venv-$*/bin/python -m pip install -q -e ".[test]"
	touch $@

# Real tools the tests drive (helm, promtool, grpcurl): see scripts/install-tools.sh.
tools: .venv/.installed
	bash scripts/install-tools.sh

# Regenerate the committed stubs (protobuf messages, .pyi, grpclib services). The imports are
# rewritten to live under deviceapi.proto so the .proto file names stay those of the reference
# server (device/v1alpha1/gpu.proto), which reflection clients see. SPEC §7.1's package
# (nvidia.nvsentinel.v1alpha1) is generated the same way, under deviceapi.proto.nvsentinel.
proto: export PATH := $(abspath .venv/bin):$(PATH)
proto:
	$(PY) -m grpc_tools.protoc -I $(PROTO_DIR) \
		--python_out=$(PROTO_DIR) --mypy_out=$(PROTO_DIR) --grpclib_python_out=$(PROTO_DIR) $(PROTOS)
	sed -i 's/^from device\.v1alpha1 import/from deviceapi.proto.device.v1alpha1 import/; s/^import device\.v1alpha1\./import deviceapi.proto.device.v1alpha1./; s/\([[ ,]\)device\.v1alpha1\./\1deviceapi.proto.device.v1alpha1./g' \
		$(PROTO_DIR)/device/v1alpha1/*_pb2.py $(PROTO_DIR)/device/v1alpha1/*_pb2.pyi $(PROTO_DIR)/device/v1alpha1/*_grpc.py
	$(PY) -m grpc_tools.protoc -I $(PROTO_DIR) \
		--python_out=$(PROTO_DIR) --mypy_out=$(PROTO_DIR) --grpclib_python_out=$(PROTO_DIR) $(DATAMODELS_PROTOS)
	sed -i 's/^import datamodels\./import deviceapi.proto.datamodels./; s/\([[ ,]\)datamodels\.health_event_pb2/\1deviceapi.proto.datamodels.health_event_pb2/g' \
		$(PROTO_DIR)/datamodels/*_grpc.py
		--python_out=$(PROTO_DIR) --mypy_out=$(PROTO_DIR) --grpclib_python_out=$(PROTO_DIR) $(NVSENTINEL_PROTOS)
	sed -i 's/^from nvsentinel\.v1alpha1 import/from deviceapi.proto.nvsentinel.v1alpha1 import/; s/^import nvsentinel\.v1alpha1\./import deviceapi.proto.nvsentinel.v1alpha1./; s/\([[ ,]\)nvsentinel\.v1alpha1\./\1deviceapi.proto.nvsentinel.v1alpha1./g' \
		$(PROTO_DIR)/nvsentinel/v1alpha1/*_pb2.py $(PROTO_DIR)/nvsentinel/v1alpha1/*_pb2.pyi $(PROTO_DIR)/nvsentinel/v1alpha1/*_grpc.py

test: .venv/.installed tools
	$(PY) -m pytest -q
	@echo "== the same suite with trio as a guest of asyncio (the server's default --bridge) =="
	$(PY) -m pytest -q --bridge guest --deselect "tests/hostile/test_hostile_churn.py::test_connect_watch_disconnect_churn_leaves_nothing_behind[10000]"
	@$(MAKE) --no-print-directory test-platforms

# The platform subset on every other Python of PYTHONS. A missing one is skipped with a note
# here, and fails the run under CI=true (CI proves every Python README names).
test-platforms: tools
	@main=$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	for v in $(PYTHONS); do \
	  [ "$$v" = "$$main" ] && continue; \
	  if ! scripts/find-python.sh $$v >/dev/null; then \
	    if [ -n "$${CI:-}" ]; then echo "test: Python $$v is not installed; CI must run every Python README names" >&2; exit 1; fi; \
	    echo "== Python $$v: not installed here, skipped (CI runs it) =="; continue; \
	  fi; \
	  $(MAKE) --no-print-directory .venv-$$v/.installed || exit 1; \
	  for bridge in trio-asyncio guest; do \
	    echo "== Python $$v, --bridge $$bridge: the platform subset =="; \
	    .venv-$$v/bin/python -m pytest -q --bridge $$bridge $(PLATFORM_TESTS) || exit 1; \
	  done; \
	done

# The real-GPU suite (tests/gpu, marker gpu): needs an NVIDIA driver. On a GPU machine without
# this venv, run it with that machine's Python: make gpu-test PY=python3 NVML_DRIVER_ROOT=...
gpu-test:
	DEVICE_API_NVML_DRIVER_ROOT=$(NVML_DRIVER_ROOT) $(PY) -m pytest -q -m gpu -p no:cacheprovider tests/gpu

lint: .venv/.installed
	$(PY) -m ruff check src tests bench examples
	$(PY) -m mypy

# A dev server: no shutdown delay (nothing to drain behind a load balancer), so Ctrl-C stops it
# at once.
run: .venv/.installed
	$(PY) -m deviceapi --simulate 8 --unix-socket /tmp/device-api/device.sock --log-format text \
		--shutdown-delay 0

# The node-scale run, then upstream's k6 workload (issue 15) as its own phase.
bench:
	$(PY) -m bench.run
	$(PY) -m bench.upstream

# Only the fan-out comparison (storms, sustained writes, 32 conditions, each next to its floor).
bench-fanout:
	$(PY) -m bench.run --only fanout

bench-upstream:
	$(PY) -m bench.upstream

chaos:
	$(PY) -m bench.chaos
