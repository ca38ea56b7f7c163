# Thin targets: each calls a Python entry point. PYTHON can point at a virtual environment.
PYTHON ?= python
DEMO ?= .demo

.PHONY: test demo bench clean-demo

test:
	$(PYTHON) -m pytest -q tests

# Does training help? On the embedded synthetic data: render training videos and held-out DAVIS-layout
# sequences (another seed), pack, train each of DEMO_METHODS for the CPU budget, score label propagation
# for the trained network, the same network at step 0 and raw pixels, then write $(DEMO)/report.md
# (table, curves, ground truth above prediction, PCA maps, the command of each step). Rerunning reuses
# the data and the finished runs.
DEMO_METHODS ?= crw dino
demo:
	$(PYTHON) -m train.learning --methods $(DEMO_METHODS) --budget cpu --out $(DEMO)
	$(PYTHON) -m train.report --bench $(DEMO)
	@echo "demo report: $(DEMO)/report.md (table: $(DEMO)/learning.md, runs: $(DEMO)/runs/)"

clean-demo:
	rm -rf $(DEMO)
