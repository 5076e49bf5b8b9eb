# make demo : set up, then prepare data -> SFT -> GRPO -> eval on the embedded tiny model (CPU)
# make demo-open : the same pipeline on the demo's open questions (no options; SEED=1 for another seed)
# make test : the test suite (CPU, a few minutes)
# make notebook : run the classroom notebook top to bottom and save it with its outputs
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := runs/demo

SEED ?= 0
OPEN := runs/demo_open/seed$(SEED)

.PHONY: demo demo-open test setup notebook clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: setup
	$(PY) data/demo/prepare.py
	$(PY) train_sft.py configs/demo_sft.yaml output_dir=$(DEMO)/sft
	$(PY) eval.py configs/demo_eval.yaml output_dir=$(DEMO)/eval_base run_name=base
	$(PY) eval.py configs/demo_eval.yaml model=$(DEMO)/sft output_dir=$(DEMO)/eval_sft run_name=sft 'image_controls=[blank,shuffled]'
	$(PY) train_grpo.py configs/demo_grpo.yaml init_adapter=$(DEMO)/sft output_dir=$(DEMO)/grpo
	$(PY) eval.py configs/demo_eval.yaml model=$(DEMO)/sft adapter=$(DEMO)/grpo output_dir=$(DEMO)/eval_grpo run_name=grpo 'image_controls=[blank,shuffled]'
	$(PY) tools/report.py $(DEMO)/eval_base $(DEMO)/eval_sft $(DEMO)/eval_grpo --train $(DEMO)/sft $(DEMO)/grpo --out $(DEMO)/report

# open questions: exact match, token F1 and recall per run, then the report of the three
demo-open: setup
	$(PY) data/demo/prepare.py --kind open
	$(PY) train_sft.py configs/demo_open_sft.yaml seed=$(SEED) output_dir=$(OPEN)/sft
	$(PY) eval.py configs/demo_open_eval.yaml seed=$(SEED) output_dir=$(OPEN)/eval_base run_name=base
	$(PY) eval.py configs/demo_open_eval.yaml seed=$(SEED) model=$(OPEN)/sft output_dir=$(OPEN)/eval_sft run_name=sft
	$(PY) train_grpo.py configs/demo_open_grpo.yaml seed=$(SEED) init_adapter=$(OPEN)/sft output_dir=$(OPEN)/grpo
	$(PY) eval.py configs/demo_open_eval.yaml seed=$(SEED) model=$(OPEN)/sft adapter=$(OPEN)/grpo output_dir=$(OPEN)/eval_grpo run_name=grpo
	$(PY) tools/report.py $(OPEN)/eval_base $(OPEN)/eval_sft $(OPEN)/eval_grpo --train $(OPEN)/sft $(OPEN)/grpo --out $(OPEN)/report

# from scratch each time (runs/notebook removed), so the saved outputs show every step; make demo's SFT model is reused
notebook: setup
	rm -rf runs/notebook
	$(PY) notebooks/run.py notebooks/grpo_walkthrough.ipynb

# pytest exits 5 when it collects no tests: a broken checkout, not a pass, so say so and fail
test: setup
	@$(PY) -m pytest -q tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests under tests/" >&2; fi; exit $$status

clean-demo:
	rm -rf $(DEMO) runs/demo_open data/demo/prepared data/demo/prepared_open
