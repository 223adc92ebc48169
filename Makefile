# The two commands of the README:
#   make speedrun   set up .venv and run the main job (the whole recipe on a laptop CPU)
#   make test       set up .venv and run the test suite
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
# The CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: setup speedrun test test-slow bench clean

$(BIN)/sputnik: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/sputnik

setup: $(BIN)/sputnik

speedrun: setup
	$(BIN)/sputnik speedrun $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS)

clean:
	rm -rf $(VENV) runs
