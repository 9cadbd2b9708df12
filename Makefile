# Set-up and everyday commands. `make demo` and `make test` do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The reference prior (oracle for parity tests) is installed without its training dependencies.
ORACLE := dalle2-pytorch==0.11.5
# The web page's Gradio declares pillow<13; it is installed without its declared dependencies (the
# `ui` extra lists what its import needs) so that the runtime keeps pillow 13.0.0.
GRADIO := gradio==6.31.0

.PHONY: install demo demo-search ui test test-slow lint bench bench-quick serve schema clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,batch,search,ui]'
	$(PY) -m pip install -q --no-deps $(ORACLE) $(GRADIO)
	touch $(STAMP)

install: $(STAMP)

# The whole job offline on the tiny random models (a pipeline check: the pictures mean nothing).
demo: $(STAMP)
	DIDP_WEIGHTS=tiny $(VENV)/bin/didp -i prompt="a lighthouse on a cliff at night" -i iterations=10 \
		-i display_freq=5 -i num_scales=5 -i seed=7 -o outputs/demo

# The web page on http://127.0.0.1:$(UI_PORT)/, offline on the tiny models unless DIDP_WEIGHTS says otherwise.
UI_PORT ?= 7860
ui: $(STAMP)
	DIDP_WEIGHTS=$(DIDP_WEIGHTS) $(VENV)/bin/didp ui --port $(UI_PORT)
# Image search offline on the tiny models: a generated folder of colours and patterns (with hostile
# files among them) indexed on a local Ray, then searched with one of its pictures (a pipeline
# check: with the tiny random CLIP the rankings mean nothing beyond the picture finding itself).
demo-search: $(STAMP)
	rm -rf outputs/search-demo
	$(PY) -m testkit.images outputs/search-demo/images
	DIDP_WEIGHTS=tiny $(VENV)/bin/didp index outputs/search-demo/images -o outputs/search-demo/index
	DIDP_WEIGHTS=tiny $(VENV)/bin/didp search outputs/search-demo/index -i prompt="a red disc" \
		-i image=@outputs/search-demo/images/sub/red-disc.png -i k=10 -o outputs/search-demo/found

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/run.py --json benchmarks/results.json

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick --json benchmarks/results-quick.json

# The real Cog HTTP server on 127.0.0.1:$(PORT), schema in place (coglet starts its worker as
# `python` from PATH, hence the venv first on PATH). Tiny weights unless DIDP_WEIGHTS says otherwise.
PORT ?= 5000
DIDP_WEIGHTS ?= tiny
serve: $(STAMP)
	$(PY) -m commands.cog_schema
	PATH="$(abspath $(VENV))/bin:$$PATH" PYTHONPATH=. PORT=$(PORT) DIDP_WEIGHTS=$(DIDP_WEIGHTS) \
		COG_PREDICT_TYPE_STUB=predict.py:Predictor $(PY) -m cog.server.http --host 127.0.0.1

schema: $(STAMP)
	$(PY) -m commands.cog_schema
	$(PY) -m commands.readme_table --write

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
