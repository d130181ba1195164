# The user's doors: `make install`, `make test`, `make train`. Each installs what it needs first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The venv's bin on PATH: TorchX's local scheduler runs `torchrun` by name.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
EXTRAS ?= cpu,test,s3,gcs,azure,kubernetes
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
OUTPUT ?= runs/recap-local
# Config overrides for `make train`, e.g. make train ARGS='training.num_train_steps=400'.
ARGS ?=
# Where torch comes from. PyPI's linux torch is the CUDA build (~3 GB with its nvidia-* wheels); PyTorch's
# CPU index serves torch==X+cpu (~190 MB), which pip prefers to PyPI's X for the pin `torch==X`.
# Default: the CPU index on a machine without an NVIDIA GPU, unless pip is configured with indexes or wheel
# folders of its own (a mirror, a proxy, local wheels, as on this project's CI machines), which it then
# uses alone. Empty (`make install TORCH_INDEX_URL=`): only pip's configured indexes.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?= $(shell nvidia-smi -L >/dev/null 2>&1 || { env; python3 -m pip config list 2>/dev/null; } \
	| grep -Eiq '^(PIP_(INDEX_URL|EXTRA_INDEX_URL|FIND_LINKS)=|[^ ]*\.(index-url|extra-index-url|find-links)=)' \
	|| echo $(TORCH_CPU_INDEX))
TORCH_PIN := $(shell sed -n 's/^ *"\(torch==[^"]*\)",$$/\1/p' pyproject.toml)
# Images: <IMAGE_REPO>:<version>-cpu / -cuda, the tags the README's Kubernetes commands name.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE_REPO ?= recap
IMAGE ?= $(IMAGE_REPO):$(VERSION)-cpu
IMAGE_CUDA ?= $(IMAGE_REPO):$(VERSION)-cuda
# docker when a daemon answers, else podman (a docker CLI without a daemon does not count).
CONTAINER_TOOL ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
# Extra build flags, e.g. --build-arg PYTHON_IMAGE=... (tests/cluster/container_lib.py passes its own).
IMAGE_BUILD_FLAGS ?=

.PHONY: install test test-cluster train lint image image-cuda

$(STAMP): pyproject.toml packaging/fbgemm-gpu-cpu-shim/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(if $(TORCH_INDEX_URL),$(VENV)/bin/pip install --extra-index-url $(TORCH_INDEX_URL) '$(TORCH_PIN)',@echo "$(TORCH_PIN) from pip's configured indexes (TORCH_INDEX_URL is empty)")
	$(VENV)/bin/pip install --upgrade-strategy only-if-needed -e '.[$(EXTRAS)]'
	$(VENV)/bin/pip check
	touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest -q

# Needs root: starts a real Slurm cluster on this host (see tests/cluster/).
test-cluster: install
	$(PY) -m pytest -q -m cluster tests/cluster

train: install
	torchx run -s local_cwd recap.train -j 1x2 --output $(OUTPUT)$(if $(ARGS), -- $(ARGS))
	@$(VENV)/bin/recap summary $(OUTPUT)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

image:
	$(CONTAINER_TOOL) build -f docker/Dockerfile -t $(IMAGE) $(IMAGE_BUILD_FLAGS) .

image-cuda:
	$(CONTAINER_TOOL) build -f docker/Dockerfile.cuda -t $(IMAGE_CUDA) $(IMAGE_BUILD_FLAGS) .
