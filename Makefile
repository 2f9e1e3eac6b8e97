# make quickstart: set up, pretrain aim-tiny on Fashion-MNIST (10 min), probe it against baselines
# make test:       set up, run the test suite
.PHONY: setup quickstart test peers bench
MINUTES ?= 10
RUN ?= runs/aim-tiny

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/imagelm pretrain aim-tiny --out $(RUN) --minutes $(MINUTES)
	.venv/bin/imagelm eval $(RUN) --baselines

test: setup
	.venv/bin/python -m pytest -q

# peers (timm, lightly) need torchvision, hence torch 2.14.1: a separate venv. torch and
# torchvision are pinned first (a bare "torch" would resolve to another build), then imagelm with its
# own dependencies and the peers/test extras.
peers:
	[ -x .venv-peers/bin/python ] || python3 -m venv .venv-peers
	.venv-peers/bin/python -c "import torch, torchvision" 2>/dev/null || \
		.venv-peers/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	.venv-peers/bin/pip install -q -e ".[peers,test]" lightly

bench: peers
	.venv-peers/bin/imagelm bench aim-tiny
