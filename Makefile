# vlm-recipes. Quickstart: `make demo`, `make test`. Every target sets itself up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= outputs

.PHONY: setup test test-slow test-families demo eval bench serve new-recipe clean-venv

setup: $(STAMP)

# Re-runs only when the requirements, constraints or setup script change: fast when already done.
# CONSTRAINTS= (empty) installs the newest versions requirements.txt allows instead of constraints.txt's.
CONSTRAINTS ?= constraints.txt
$(STAMP): requirements.txt constraints.txt pyproject.toml scripts/setup_venv.sh
	VENV=$(VENV) PYTHON=$(PYTHON) CONSTRAINTS=$(CONSTRAINTS) bash scripts/setup_venv.sh
	touch $(STAMP)

# Test files run in parallel, TEST_WORKERS at a time (each file in one worker, so that its fixtures' runs are
# shared); TEST_WORKERS=0 runs them one after another.
TEST_WORKERS ?= 2
PYTEST := -m pytest -q -n $(TEST_WORKERS) --dist loadfile
test: setup
	$(PY) $(PYTEST) -m "not matrix and not slow" tests

# The rest (CI runs it after `make test`, ~3 min): 2-process runs whose 1-process code `make test` covers,
# the READMEs' real-data commands and their quoted figures.
test-slow: setup
	$(PY) $(PYTEST) -m "slow and not matrix" tests

# Every image-text-to-text family: their tests, and each family through llava_instruct and qlora_vqa on 1 and
# 2 processes with merge and chat (tests/test_family_matrix.py and the other tests marked `matrix`, ~10 min).
# Four families' processors need torchvision, and PyPI's torchvision loads only beside PyPI's (CUDA) torch:
# so a second environment, $(FAMILIES_VENV) (~6.5 GB), with torch 2.14.1 + torchvision 0.29.1, which run on
# the CPU too.
FAMILIES_VENV ?= .venv-torchvision
FAMILY_TESTS := tests/test_vlm_families.py tests/test_tiny_families_a.py tests/test_tiny_families_b.py \
	tests/test_family_matrix.py tests/test_bench_qwen.py tests/test_chat_labels_reference.py \
	tests/test_chat_cut_images.py tests/test_encode_workers.py \
	tests/test_llava_recipe.py::test_two_processes_equal_one_process_with_the_same_global_batch \
	tests/test_llava_recipe.py::test_two_processes_resumed_in_a_later_epoch_train_its_batches \
	tests/test_two_process_resume.py
test-families:
	test -x $(FAMILIES_VENV)/bin/python || $(PYTHON) -m venv $(FAMILIES_VENV)
	$(FAMILIES_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	VENV=$(FAMILIES_VENV) PYTHON=$(PYTHON) CONSTRAINTS=$(CONSTRAINTS) bash scripts/setup_venv.sh
	VLM_RECIPES_CACHE="$(abspath $(FAMILIES_VENV))/cache" $(FAMILIES_VENV)/bin/python $(PYTEST) $(FAMILY_TESTS)

# The main job on the embedded default: synthetic captions + tiny BLIP-2 (built and pre-trained on first
# use), LoRA fine-tuning, held-out metrics before and after, then the report of `make eval`.
ACCELERATE_CONFIG ?= accelerate_configs/$(if $(shell nvidia-smi -L 2>/dev/null),single_gpu,cpu).yaml
DEMO_RUN := $(OUT)/blip2_lora_caption
demo: setup
	rm -rf $(DEMO_RUN)  # a fresh demo: a run refuses a folder that holds an earlier run's checkpoints
	$(PY) -m accelerate.commands.launch --quiet --config_file $(ACCELERATE_CONFIG) \
		recipes/blip2_lora_caption/train.py --output_dir $(DEMO_RUN)
	$(PY) -m eval report $(DEMO_RUN)
	$(PY) scripts/demo_summary.py $(DEMO_RUN)

# Scores the latest run of each recipe under $(OUT)/ (or RUN=path): a table; report.md + gallery.html per run.
eval: setup
	$(PY) -m eval report $(if $(RUN),$(RUN),--outputs $(OUT))

# HTTP API (OpenAI-style) + web page for trained runs: RUN is one or more run folders (default: the demo run).
RUN_TO_SERVE = $(if $(RUN),$(RUN),$(DEMO_RUN))
HOST ?= 127.0.0.1
PORT ?= 8000
serve: setup
	$(PY) -m serve $(RUN_TO_SERVE) --host $(HOST) --port $(PORT)

bench: setup
	$(PY) -m bench.data_eval

# Checked while the Makefile is read, so a missing argument fails before `setup` runs.
ifneq ($(filter new-recipe,$(MAKECMDGOALS)),)
ifeq ($(and $(FROM),$(NAME)),)
$(error new-recipe needs FROM and NAME, e.g. make new-recipe FROM=blip2_lora_caption NAME=my_task)
endif
endif
new-recipe: setup
	$(PY) scripts/new_recipe.py --from $(FROM) --name $(NAME) --smoke

clean-venv:
	rm -rf $(FAMILIES_VENV)
	rm -rf $(VENV)
