# Thin targets: each calls a Python entry point. PYTHON can point at a virtual environment.
PYTHON ?= python
DEMO ?= .demo

.PHONY: test demo bench clean-demo

test:
	$(PYTHON) -m pytest -q tests

demo:
	bash shard_tools/demo.sh $(DEMO) $(PYTHON)

clean-demo:
	rm -rf $(DEMO)
