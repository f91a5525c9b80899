# Two entry points for a fresh machine (Debian, Python 3.11, root or sudo for apt):
#   make quickstart   set up, then run the quickstart search on Fashion-MNIST
#   make test         set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data quickstart test test-all ui clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST ships in Debian's dataset-fashion-mnist package.
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }

quickstart: setup
	$(BIN)/comod search run search_spaces/quickstart.yaml --name quickstart-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

ui: setup
	$(BIN)/comod ui

clean:
	rm -rf $(VENV) comod-runs
