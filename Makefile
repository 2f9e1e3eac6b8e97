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

# benchmark peers (timm, lightly) need torchvision, hence torch 2.14.1: a separate venv
peers:
	[ -x .venv-peers/bin/python ] || python3 -m venv .venv-peers
	.venv-peers/bin/pip install -q torch==2.14.1 torchvision==0.29.1 timm lightly
	.venv-peers/bin/pip install -q --no-deps -e .
	.venv-peers/bin/pip install -q safetensors pyyaml tqdm tensorboard matplotlib pillow

bench: peers
	.venv-peers/bin/imagelm bench aim-tiny
