# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Each creates .venv on first use. torch comes from the local CPU wheel first,
# so transformers/peft never pull a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: demo test test-fast bench venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -m rsdjax.eval.lm_eval_hook install
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Two workers, whole files each (--dist loadfile): most tests wait on one-threaded XLA compiles,
# so two processes keep both cores busy. Pass PYTEST_WORKERS=0 to run in one process.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python scripts/bench_infer.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_serve.py
	$(BIN)/python scripts/bench_serve_vllm.py
	$(BIN)/python scripts/bench_lora.py

clean:
	rm -rf $(VENV)
