# The project's two commands: `make quickstart` and `make test`.
# Both create a virtual environment in $(VENV) first (pip only; torch/torchvision pinned as a pair,
# everything else at the versions the tests pass on, constraints.txt).

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

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# One intra-op thread per process: tests run several processes (ranks, workers) on small machines.
# Two pytest-xdist workers, one per core of the 2-core CI machine. --dist loadfile: each test file
# runs on one worker, in its own order, with its module fixtures built once, and what one file's
# tests share (tests/test_slurm.py's cluster) is never used twice at once. Not loadgroup: with
# pytest 9.2, xdist 3.8 ignores xdist_group marks (pytest-xdist#1386). PYTEST_ARGS comes last:
# `make test PYTEST_ARGS="-n 0 tests/test_x.py"` runs one file serially.
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -rs -n 2 --dist loadfile $(PYTEST_ARGS)

# synth -> extract -> pretrain (2 stages) -> export -> fine-tune; every step resumes or redoes
# idempotently, so re-running `make quickstart` after an interruption continues. The fine-tuning
# images go through the pretraining extraction's network: its batch-norm calibration is loaded
# (detector.calibration_from), not redone on them, so the features match what the model learned on.
QS := $(QUICKSTART_DIR)
quickstart: venv
	$(PY) -m preprocess synth --out $(QS)/raw --num-samples 1200 --seed 0 --samples-per-shard 200
	$(PY) -m preprocess extract --input '$(QS)/raw/{00000..00005}.tar' --output $(QS)/features --config configs/preprocess/quickstart.yaml
	$(PY) -m pretrain --config configs/pretrain/quickstart.yaml --run-dir $(QS)/pretrain --resume shards_root=$(QS)/features
	$(PY) -m pretrain.export --run $(QS)/pretrain --out $(QS)/release
	$(PY) -m finetune.synth_tasks --task retrieval --out $(QS)/finetune/raw/train --num-samples 800 --samples-per-shard 400 --seed 0
	$(PY) -m finetune.synth_tasks --task retrieval --out $(QS)/finetune/raw/test --num-samples 40 --captions-per-image 5 --samples-per-shard 400 --seed 1
	$(PY) -m preprocess extract --input '$(QS)/finetune/raw/train/{00000..00001}.tar' --output $(QS)/finetune/features/train --config configs/preprocess/quickstart.yaml detector.calibration_from=$(QS)/features
	$(PY) -m preprocess extract --input '$(QS)/finetune/raw/test/00000.tar' --output $(QS)/finetune/features/test --config configs/preprocess/quickstart.yaml detector.calibration_from=$(QS)/features
	$(PY) -m finetune --config configs/finetune/retrieval.yaml --init $(QS)/release --run-dir $(QS)/finetune/run --resume shards_root=$(QS)/finetune/features
	$(PY) -m finetune.evaluate --checkpoint $(QS)/finetune/run --data '$(QS)/finetune/features/test/00000.tar' --out $(QS)/finetune/results.json --baselines $(QS)/finetune/raw/test/task.json

clean-quickstart:
	rm -rf $(QUICKSTART_DIR)
