# make quickstart: set up, pretrain aim-tiny on Fashion-MNIST (10 min), probe it against raw pixels
# make test:       set up, run the test suite (and the timm parity tests in .venv-peers)
.PHONY: setup quickstart test peers bench
MINUTES ?= 10
RUN ?= runs/aim-tiny
# raw pixels, the baseline to beat; BASELINES="raw_pixels random_init" adds the untrained encoder (~1:30 on a 2-core Xeon, ~2:30 on an EPYC; then cached)
BASELINES ?= raw_pixels

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/imagelm pretrain aim-tiny --out $(RUN) --minutes $(MINUTES)
	.venv/bin/imagelm eval $(RUN) $(BASELINES:%=--baseline %)

# the suite in .venv, then the tests that need timm (marked `timm`) in .venv-peers
test: setup
	.venv/bin/python -m pytest -q
	$(MAKE) peers
	.venv-peers/bin/python -m pytest -q -m timm

# peers (timm, lightly) need torchvision, hence torch 2.14.1: a separate venv. torch and
# torchvision are pinned first (a bare "torch" would resolve to another build), then imagelm with its
# own dependencies and the peers/test extras. torch 2.14.1 from PyPI is the CUDA build (~0.55 GB
# plus ~3 GB of nvidia-* wheels; 1m45s from local wheels here): PEERS_INDEX=https://download.pytorch.org/whl/cpu
# takes the CPU build where that index is reachable.
PEERS_INDEX ?=
peers:
	[ -x .venv-peers/bin/python ] || python3 -m venv .venv-peers
	.venv-peers/bin/python -c "import torch, torchvision" 2>/dev/null || \
		.venv-peers/bin/pip install -q $(if $(PEERS_INDEX),--index-url $(PEERS_INDEX)) torch==2.14.1 torchvision==0.29.1
	.venv-peers/bin/pip install -q -e ".[peers,test]" lightly

bench: peers
	.venv-peers/bin/imagelm bench aim-tiny
