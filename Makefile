# vlm-recipes. Quickstart: `make demo`, `make test`. Every target sets itself up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= outputs
# Scripts and `python -m` run from the repo root import data_tools, eval and recipes from here.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup test demo bench clean-venv

setup: $(STAMP)

# Re-runs only when requirements.txt or the setup script change: fast when already done.
$(STAMP): requirements.txt scripts/setup_venv.sh
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/setup_venv.sh
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

# Until the main recipe lands, the demo runs the data and eval tools on the synthetic set.
DEMO := $(OUT)/demo_data
demo: setup
	$(PY) -m data_tools synth --task caption --n 500 --out-dir $(DEMO) --seed 0
	$(PY) -m data_tools clean --task caption $(DEMO)/caption.jsonl --out $(DEMO)/clean.jsonl --rejects $(DEMO)/rejects.jsonl
	$(PY) -m data_tools dedup --task caption $(DEMO)/clean.jsonl --out $(DEMO)/dedup.jsonl --report $(DEMO)/dedup_report.jsonl
	$(PY) -m data_tools split $(DEMO)/dedup.jsonl --out-dir $(DEMO) --ratios 0.8,0.1,0.1 --seed 0
	$(PY) -m data_tools check-leakage $(DEMO)/train.jsonl $(DEMO)/val.jsonl $(DEMO)/test.jsonl
	$(PY) scripts/demo_baselines.py --train $(DEMO)/train.jsonl --test $(DEMO)/test.jsonl --out-dir $(DEMO)/baselines
	@echo "== constant-caption baseline (floor) on the held-out split"
	$(PY) -m eval caption --predictions $(DEMO)/baselines/constant_predictions.jsonl --references $(DEMO)/test.jsonl
	@echo "== one human caption against the others (ceiling)"
	$(PY) -m eval caption --predictions $(DEMO)/baselines/human_predictions.jsonl --references $(DEMO)/baselines/human_references.jsonl
	@echo "outputs in $(DEMO)"

bench: setup
	$(PY) -m bench.data_eval

clean-venv:
	rm -rf $(VENV)
