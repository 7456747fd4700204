# Developer entry points. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
PY := .venv/bin/python
PROTO_DIR := src/deviceapi/proto
PROTOS := $(PROTO_DIR)/device/v1alpha1/gpu.proto $(PROTO_DIR)/device/v1alpha1/provider.proto

.PHONY: proto test lint run bench bench-fanout bench-upstream chaos tools

# The virtual environment, rebuilt when the dependencies change.
.venv/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,dev]"
	touch $@

# Real tools the tests drive (helm, promtool, grpcurl): see scripts/install-tools.sh.
tools: .venv/.installed
	bash scripts/install-tools.sh

# Regenerate the committed stubs (protobuf messages, .pyi, grpclib services). The imports are
# rewritten to live under deviceapi.proto so the .proto file names stay those of the reference
# server (device/v1alpha1/gpu.proto), which reflection clients see.
proto: export PATH := $(abspath .venv/bin):$(PATH)
proto:
	$(PY) -m grpc_tools.protoc -I $(PROTO_DIR) \
		--python_out=$(PROTO_DIR) --mypy_out=$(PROTO_DIR) --grpclib_python_out=$(PROTO_DIR) $(PROTOS)
	sed -i 's/^from device\.v1alpha1 import/from deviceapi.proto.device.v1alpha1 import/; s/^import device\.v1alpha1\./import deviceapi.proto.device.v1alpha1./; s/\([[ ,]\)device\.v1alpha1\./\1deviceapi.proto.device.v1alpha1./g' \
		$(PROTO_DIR)/device/v1alpha1/*_pb2.py $(PROTO_DIR)/device/v1alpha1/*_pb2.pyi $(PROTO_DIR)/device/v1alpha1/*_grpc.py

test: .venv/.installed tools
	$(PY) -m pytest -q
	@echo "== the same suite with trio as a guest of asyncio (the server's default --bridge) =="
	$(PY) -m pytest -q --bridge guest --deselect "tests/hostile/test_hostile_churn.py::test_connect_watch_disconnect_churn_leaves_nothing_behind[10000]"

lint: .venv/.installed
	$(PY) -m ruff check src tests bench examples
	$(PY) -m mypy

run: .venv/.installed
	$(PY) -m deviceapi --simulate 8 --unix-socket /tmp/device-api/device.sock --log-format text

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
