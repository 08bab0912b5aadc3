# The project's two commands: `make quickstart` and `make test`.
# Both create a virtual environment in $(VENV) first (pip only; torch/torchvision pinned as a pair).

PYTHON ?= python3
VENV ?= .venv
QUICKSTART_DIR ?= ./quickstart-out
# torch and torchvision must come as a matching pair; override for your CUDA build.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The venv's tools first: DeepSpeed builds its CPU communication op with whichever `ninja` is on
# PATH, and two different ninjas alternating on one build cache rebuild it every time.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv test quickstart clean-quickstart

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# One intra-op thread per process: tests run several processes (ranks, workers) on small machines.
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -rs $(PYTEST_ARGS)

quickstart: venv
	$(PY) -m preprocess synth --out $(QUICKSTART_DIR)/raw --num-samples 1200 --seed 0 --samples-per-shard 200
	$(PY) -m preprocess extract --input '$(QUICKSTART_DIR)/raw/{00000..00005}.tar' --output $(QUICKSTART_DIR)/features --config configs/preprocess/quickstart.yaml

clean-quickstart:
	rm -rf $(QUICKSTART_DIR)
