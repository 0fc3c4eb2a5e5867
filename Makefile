# Fresh machine: `make demo` or `make test` creates .venv and installs pinned dependencies first.
VENV ?= .venv
PY := $(VENV)/bin/python
MT := $(PY) -m multitoken
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/stdlib-demo
DEMO_RUN ?= runs/demo
DEMO_HEADS ?= runs/demo-heads

.PHONY: venv demo test test-all lint format bench clean

venv: $(STAMP)

# With CUDA present, reuse the installed torch; otherwise install the CPU wheel of torch 2.13.0.
$(STAMP): pyproject.toml
	@if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV) && $(VENV)/bin/pip install --quiet torch==2.13.0; \
	fi
	$(VENV)/bin/pip install --quiet -e '.[all,dev]'
	touch $@

demo: $(STAMP)
	$(MT) prepare --source python-stdlib --tokenizer bpe --vocab-size 4096 --out $(DEMO_DATA)
	rm -rf $(DEMO_RUN)
	$(MT) train --data $(DEMO_DATA) --preset tiny --n-future 4 --head-style linear --seq-len 128 \
		--batch-size 4 --max-steps 1500 --warmup-steps 50 --lr 3e-3 --val-every 500 --save-every 500 --out $(DEMO_RUN)
	@echo "== heads trained on the corpus: decoding speed (completions not shown)"
	$(MT) generate --checkpoint $(DEMO_RUN) --prompts-from-data $(DEMO_DATA) --n-prompts 10 --max-new-tokens 128 \
		--stats --compare-plain > /dev/null
	@echo "== new heads, conditioned on the token just chosen, trained on the model's own continuations of 1024 train-split functions (trunk frozen)"
	$(MT) distill-data --checkpoint $(DEMO_RUN) --from-data $(DEMO_DATA) --prompt-kind code --n-prompts 1024 \
		--max-new-tokens 128 --batch-size 64 --out $(DEMO_RUN)/self.jsonl
	$(MT) prepare --source $(DEMO_RUN)/self.jsonl:text --tokenizer $(DEMO_RUN) --out $(DEMO_RUN)/self-data
	rm -rf $(DEMO_HEADS)
	$(MT) train --init-from $(DEMO_RUN) --train heads --head-style conditioned --data $(DEMO_RUN)/self-data --seq-len 128 --batch-size 8 \
		--max-steps 600 --warmup-steps 10 --lr 3e-3 --val-every 600 --save-every 600 --out $(DEMO_HEADS)
	$(MT) generate --checkpoint $(DEMO_HEADS) --prompts-from-data $(DEMO_DATA) --n-prompts 10 --max-new-tokens 128 \
		--stats --compare-plain

test: $(STAMP)
	$(PY) -m pytest -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
