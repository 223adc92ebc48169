# The two commands of the README:
#   make speedrun   set up .venv and run the main job (the whole recipe on a laptop CPU)
#   make test       set up .venv and run the test suite
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
# The CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: setup speedrun test test-slow browser clean

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

clean:
	rm -rf $(VENV) runs
