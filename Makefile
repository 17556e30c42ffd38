# `make demo`: set up .venv, build the demo corpus and tokenizer, train the CPU demo model.
# `make test`: set up .venv and run the test suite (what CI runs).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo sft-demo test bench chaos corpus tokenizer clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23" "setuptools>=64" wheel
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

data/demo_corpus/.done: | $(STAMP)
	$(PY) -m clm.corpus --output_dir data/demo_corpus
	touch $@

data/demo_tokenizer/tokenizer.json: data/demo_corpus/.done
	$(PY) -m clm.tokenizer --dataset_name data/demo_corpus --vocab_size 8192 --output_dir data/demo_tokenizer

corpus: data/demo_corpus/.done
tokenizer: data/demo_tokenizer/tokenizer.json

demo: setup tokenizer
	$(PY) train_clm.py --config configs/demo_cpu.yaml --overwrite_output_dir

outputs/demo/model.safetensors: | $(STAMP)
	$(MAKE) demo

data/sft_demo/train.jsonl: | $(STAMP)
	$(PY) -m clm.corpus --sft_file $@

# Finetunes the demo model (trained first if outputs/demo has none) on the demo records.
sft-demo: setup outputs/demo/model.safetensors data/sft_demo/train.jsonl
	$(PY) finetune/run_sft.py --config configs/sft_demo.yaml --overwrite_output_dir

bench: setup tokenizer
	$(PY) bench/data_throughput.py
	$(PY) bench/baseline_loop.py --config configs/demo_cpu.yaml --max_steps 100
	$(PY) bench/checkpoint_io.py
	$(PY) bench/zero_stages.py

# Random kill / hang / bad-step faults against a 2-process run; prints a table (~8 minutes).
chaos: setup
	$(PY) bench/chaos.py --faults 24 --seed 0

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) data outputs
