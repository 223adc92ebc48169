# The two commands of the README:
#   make speedrun   set up .venv and run the main job (the whole recipe on a laptop CPU)
#   make test       set up .venv and run the test suite
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
# The CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: setup speedrun test test-slow browser gpu-wheels clean

$(BIN)/sputnik: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/sputnik

setup: $(BIN)/sputnik

speedrun: setup
	$(BIN)/sputnik speedrun $(ARGS)

# The web-page test drives headless Chromium (Debian package); it skips when none can be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ; } || echo "chromium not installed: the web-page test will be skipped"

test: setup browser
	$(BIN)/python -m pytest $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS)

# For a session lent a GPU (benchmarks/gpu_check.sh): the GPU machine has torch and transformers but
# no package registry; TRL and the packages it needs beyond that image travel as Python 3.12 wheels.
GPU_WHEELS = trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
gpu-wheels:
	mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs
