# Set-up and checks. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch; override on a GPU cluster (e.g. TORCH_SPEC="torch==2.13.0+cu128").
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: demo demo-oracle test test-fast test-gpu lint venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,fid,diffusers]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

# MNIST end to end on CPU: shards, a few minutes of training, Γ, samples, NLL (docs/RESULTS.md).
demo: venv
	PYTHON=$(abspath $(PY)) bash tools/reproduce_mnist.sh --profile demo --out demo_out

# The same maths on a 2-D Gaussian mixture with an exact ε* (no training), ~40 s.
demo-oracle: venv
	$(PY) -m adpm_dist.stages.demo --out demo_oracle_out

test: lint
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# The edit-test loop: lint, then the unit and oracle tests only (no real S3 server, no SLURM
# cluster, nothing marked slow); under 3 minutes on the 2-core CI machine. `make test` is the gate.
test-fast: lint
	$(PY) -m pytest -q -ra -m "not s3 and not slurm and not slow" $(PYTEST_ARGS)

# The GPU tier only (tests marked `gpu`; they skip with a reason where no CUDA device exists).
test-gpu: venv
	$(PY) -m pytest -q -ra -m gpu $(PYTEST_ARGS)

# Style, then the architecture contracts of .importlinter (docs/architecture.md).
lint: venv
	$(PY) -m ruff check adpm_dist tools tests
	$(VENV)/bin/lint-imports --no-cache --no-logo

clean:
	rm -rf $(VENV) demo_out demo_oracle_out .pytest_cache .ruff_cache
