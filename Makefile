# One command each (see README): `make serve` sets up and runs the main job; `make test` sets up
# and runs the tests. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine pass e.g. TORCH_SPEC="torch==2.11.0".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.vattn-installed

.PHONY: setup serve demo test test-gpu gpu-proof bench-mapping lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/vattn serve $(ARGS)

demo: setup
	$(VENV)/bin/vattn demo

test: setup
	$(PY) -m pytest -q

test-gpu: setup
	$(PY) -m pytest -q -m gpu

# The GPU proof in resumable parts (docs/testing.md, "The GPU proof"). No `setup` prerequisite: the GPU
# machine has no network; the command installs .devwhl's wheels and builds the extension itself.
# It runs with .venv's Python where there is one, else python3 (e.g. ARGS="--parts suite").
gpu-proof:
	$(if $(wildcard $(PY)),$(PY),python3) -m benchmarks.gpu_proof $(ARGS)

bench-mapping: setup
	$(PY) -m benchmarks.bench_mapping

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info replica/_vmm*.so
