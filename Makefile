# vlm-recipes. Quickstart: `make demo`, `make test`. Every target sets itself up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= outputs

.PHONY: setup test demo eval bench clean-venv

setup: $(STAMP)

# Re-runs only when requirements.txt or the setup script change: fast when already done.
$(STAMP): requirements.txt scripts/setup_venv.sh
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/setup_venv.sh
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

# Until the main recipe lands, the demo runs the data and eval tools on the synthetic set.
demo: setup
	$(PY) -m data_tools synth --task caption --n 300 --out-dir $(OUT)/demo_data --seed 0
	$(PY) -m data_tools clean --task caption $(OUT)/demo_data/caption.jsonl --out $(OUT)/demo_data/clean.jsonl --rejects $(OUT)/demo_data/rejects.jsonl
	$(PY) -m data_tools dedup --task caption $(OUT)/demo_data/clean.jsonl --out $(OUT)/demo_data/dedup.jsonl --report $(OUT)/demo_data/dedup_report.jsonl
	$(PY) -m data_tools split $(OUT)/demo_data/dedup.jsonl --out-dir $(OUT)/demo_data/splits --ratios 0.8,0.1,0.1 --seed 0
	$(PY) -m data_tools check-leakage $(OUT)/demo_data/splits/train.jsonl $(OUT)/demo_data/splits/val.jsonl $(OUT)/demo_data/splits/test.jsonl
	$(PY) -m eval caption --predictions $(OUT)/demo_data/splits/test.jsonl --references $(OUT)/demo_data/splits/test.jsonl --prediction-field first-caption

bench: setup
	$(PY) -m bench.data_eval

clean-venv:
	rm -rf $(VENV)
