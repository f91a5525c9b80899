# Two entry points for a fresh machine (Debian, Python 3.11, root or sudo for apt):
#   make quickstart   set up, then run the quickstart search on Fashion-MNIST
#   make test         set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data postgres chromium slurm quickstart test test-all ui clean

setup: $(STAMP) data

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST ships in Debian's dataset-fashion-mnist package.
data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }

# The team-services tests start their own PostgreSQL server (initdb in a temp
# folder): only Debian's binaries are needed, not the cluster the package would
# create and start, so postgresql-common is told to make none first.
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q postgresql-common && \
	    $$SUDO sed -ri 's/^#?\s*create_main_cluster\s*=.*$$/create_main_cluster = false/' \
	      /etc/postgresql-common/createcluster.conf && \
	    $$SUDO apt-get install -y -q postgresql; }

# The UI test opens the MLflow UI in a real headless browser: Debian's chromium
# (skipped, with the reason, where it is not installed).
chromium:
	@command -v chromium >/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

# The Slurm test starts its own single-node Slurm (munged, slurmctld and slurmd on 127.0.0.1, from a temp
# folder, with a munge key of its own): only Debian's binaries are needed.
slurm:
	@test -x /usr/sbin/slurmctld -a -x /usr/sbin/slurmd -a -x /usr/sbin/munged || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q slurm-wlm munge; }

quickstart: setup
	$(BIN)/comod search run search_spaces/quickstart.yaml --name quickstart-$$(date +%Y%m%d-%H%M%S)

test: setup postgres chromium slurm
	$(BIN)/python -m pytest -q

test-all: setup postgres chromium slurm
	$(BIN)/python -m pytest -q -m ''

ui: setup
	$(BIN)/comod ui

clean:
	rm -rf $(VENV) comod-runs
