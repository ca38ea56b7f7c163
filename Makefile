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
DEVICE ?= cuda
BUDGET ?= 480
OUT ?= gpu-report

.PHONY: test demo bench clean-demo gpu-report

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
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

# The whole flow on the embedded synthetic data, on a CPU. Rerunning resumes:
# packing finds its finished datasets and training continues its run directories.
demo: $(ENV)
	$(PYTHON) shard_tools/synth.py --out $(DEMO)/raw --videos 12 --classes 3 --davis 2 --frames 32
	$(PYTHON) shard_tools/pack.py --kind videos --src $(DEMO)/raw/videos --out $(DEMO)/shards/train \
	    --fps 25 --short-side 96 --shard-size 2e6 --workers 2 --quiet
	$(PYTHON) shard_tools/pack.py --kind frames --src $(DEMO)/raw/davis --out $(DEMO)/shards/davis --quiet
	$(PYTHON) shard_tools/inspect.py $(DEMO)/shards/train --verify
	$(PYTHON) pipeline/bench.py --data $(DEMO)/shards/train --family grid multicrop --paths cpu baseline \
	    --batch-size 4 --steps 3 --warmup 1 --workers 1
	$(PYTHON) train/run.py --method crw --data $(DEMO)/shards/train --out $(DEMO)/runs/crw --steps 10 --cpu \
	    --resume auto --data.batch_size 4 --data.num_workers 0 \
	    --crw.size 96 --crw.patch_size 32 --crw.patch_stride 16 --crw.frame_stride 2
	$(PYTHON) train/run.py --method dino --data $(DEMO)/shards/train --out $(DEMO)/runs/dino --steps 40 --cpu \
	    --resume auto --data.batch_size 4 --data.num_workers 0 --model.arch vit_tiny_patch16 \
	    --dino.global_size 64 --dino.local_size 32 --dino.local_crops 2 --dino.out_dim 256 \
	    --dino.head_hidden_dim 64 --dino.head_bottleneck_dim 32
	# The synthetic sequences are 128x96; CRW's protocol reads frames at their native size (DAVIS: 480p),
	# so evaluate them at DAVIS's short side of 480, as the dino preset does.
	$(PYTHON) eval/run.py labelprop --ckpt $(DEMO)/runs/crw --data $(DEMO)/shards/davis --protocol crw \
	    --short-side 480 --visualize
	$(PYTHON) eval/run.py labelprop --ckpt $(DEMO)/runs/dino --data $(DEMO)/shards/davis --protocol dino --visualize
	$(PYTHON) eval/run.py knn --ckpt $(DEMO)/runs/dino --data $(DEMO)/shards/train
	@echo "demo outputs in $(DEMO)/: shards/, runs/{crw,dino}/ (tb/, backbone.safetensors, eval/*/vis/*.png|gif)"

clean-demo:
	rm -rf $(DEMO)

gpu-report:
	$(PYTHON) -m train.gpu_report --device $(DEVICE) --budget $(BUDGET) --out $(OUT)
