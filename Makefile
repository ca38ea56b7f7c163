# Thin targets: each calls a Python entry point.
#
# `make test` and `make demo` find or create their environment: a virtual environment in $(VENV)
# (default .venv) with the pinned torch installed first, then this project with its $(EXTRAS) extras;
# the installation is redone only when pyproject.toml changes (the stamp file). Managing your own
# environment? Pass its interpreter, `make test PYTHON=python3`: nothing is installed then.
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= gpu,dev
ifeq ($(origin PYTHON),undefined)
PYTHON := $(VENV)/bin/python
ENV := $(VENV)/.densevid-installed
else
ENV :=
endif
DEMO ?= .demo
# make gpu-report: every GPU check and benchmark in one time-boxed run (python -m train.gpu_report --help).
# DEVICE=cpu is the dry run at tiny sizes; on a lent GPU: make gpu-report PYTHON=python3 OUT=$$OUT
# (with TRAIN="SRC ..." EVAL=DAVIS_DIR, as for demo-real, its learning benchmark runs on real video).
DEVICE ?= cuda
BUDGET ?= 480
OUT ?= gpu-report

.PHONY: test demo demo-real bench clean-demo gpu-report

$(VENV)/.densevid-installed: pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e '.[$(EXTRAS)]'
	$(VENV)/bin/python -c "import torch, av, webdataset; print('environment $(VENV): torch', torch.__version__, '| av', av.__version__)"
	touch $@

# Every test, the slow end-to-end ones included (CI runs this target). `make test PYTEST_ARGS='-m "not slow"'`
# skips those for a quick check. Exit 5 (no test collected) fails like any other failure.
PYTEST_ARGS ?=
test: $(ENV)
	$(PYTHON) -m pytest -q --durations=10 $(PYTEST_ARGS) tests

# Does training help? On the embedded synthetic data: render training videos and held-out DAVIS-layout
# sequences (another seed), pack, train each of DEMO_METHODS for the CPU budget, score label propagation
# for the trained network, the same network at step 0 and raw pixels, then write $(DEMO)/report.md
# (table, curves, ground truth above prediction, PCA maps, the command of each step). Rerunning reuses
# the data and the finished runs.
DEMO_METHODS ?= crw dino smtc
demo: $(ENV)
	$(PYTHON) -m train.learning --methods $(DEMO_METHODS) --budget cpu --out $(DEMO)
	$(PYTHON) -m train.report --bench $(DEMO)
	@echo "demo report: $(DEMO)/report.md (table: $(DEMO)/learning.md, runs: $(DEMO)/runs/)"

# The same report on real video: train on TRAIN (video files, folders of videos, DAVIS-layout folders,
# packed datasets; DIR:NAME,... chooses sequences) and score the DAVIS-layout sequences of EVAL, none
# of which may be trained on. E.g. make demo-real TRAIN="videos/ DAVIS:bmx-trees,camel" EVAL=DAVIS:blackswan
DEMO_REAL ?= .demo-real
demo-real: $(ENV)
	@test -n "$(TRAIN)" && test -n "$(EVAL)" || { echo 'usage: make demo-real TRAIN="SRC ..." EVAL=DAVIS_DIR[:NAME,...]' >&2; exit 2; }
	$(PYTHON) -m train.learning --methods $(DEMO_METHODS) --budget cpu --train-data $(TRAIN) --eval-data $(EVAL) --out $(DEMO_REAL)
	$(PYTHON) -m train.report --bench $(DEMO_REAL)
	@echo "real-video demo report: $(DEMO_REAL)/report.md (table: $(DEMO_REAL)/learning.md)"

clean-demo:
	rm -rf $(DEMO) $(DEMO_REAL)

gpu-report:
	$(PYTHON) -m train.gpu_report --device $(DEVICE) --budget $(BUDGET) --out $(OUT) \
		$(if $(TRAIN),--train-data $(TRAIN) --eval-data $(EVAL))
