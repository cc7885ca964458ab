# mlx-starflow. Every target creates the project's virtual environment (.venv) if it is missing.
#   make demo     the main job on the shipped demo model: a grid of every class, offline, in seconds
#   make test     the whole test suite (Python, then the Swift package)
PYTHON   ?= python3
SWIFT    ?= swift
VENV     := .venv
PY       := $(VENV)/bin/python
STARFLOW := $(VENV)/bin/starflow
BASE     := $(VENV)/.installed-base
DEV      := $(VENV)/.installed-dev

# generate / convert
PROMPT   ?= a film still of a cat playing piano
MODEL    ?= apple/starflow
CKPT     ?= ckpts/starflow_3B_t2i_256x256.pth
CONFIG   ?= convert/configs/starflow_3B_t2i_256x256.yaml
OUT      ?= weights/starflow-3b
DTYPE    ?= bfloat16
# Core ML
COREML_MODEL ?= weights/demo
COREML_OUT   ?= weights/coreml/$(notdir $(COREML_MODEL))
COREML_FLAGS ?=
# demo model training (Linux development may set BLAS_PRELOAD to a fast BLAS, see README)
DEMO_DATA    ?= build/demo-data
DEMO_RUN     ?= build/demo-run
BLAS_PRELOAD ?=
SWIFT_RESOURCES := app/swift/Tests/Resources/make_test_resources.py

.PHONY: setup test test-python test-swift demo demo-model generate convert coreml coreml-check bench clean

$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(DEV): $(BASE)
	$(PY) -m pip install --quiet -e '.[test,coreml]'
	touch $@

setup: $(BASE)

demo: $(BASE)
	$(STARFLOW) generate --model weights/demo --all-labels --grid --sequential --seed 0 --output outputs/demo-grid.png --force

generate: $(BASE)
	$(STARFLOW) generate "$(PROMPT)" --model $(MODEL) --dtype $(DTYPE)

demo-model: $(BASE)
	$(STARFLOW) demo-data $(DEMO_DATA) --count 12000 --seed 0 --force
	$(if $(BLAS_PRELOAD),LD_PRELOAD=$(BLAS_PRELOAD)) $(STARFLOW) train $(DEMO_DATA) --config configs/demo.yaml --out $(DEMO_RUN) --force \
		--steps 3000 --batch-size 32 --lr 1e-3 --min-lr 1e-5 --warmup-steps 200 --grad-clip 1.0 --seed 0 \
		--heldout 0.05 --checkpoint-every 500 --sample-every 500
	rm -rf weights/demo
	cp -R $(DEMO_RUN)/model weights/demo

convert: $(BASE)
	$(STARFLOW) convert $(CKPT) --config $(CONFIG) --out $(OUT) --dtype $(DTYPE)

test: test-python test-swift

test-python: $(DEV)
	$(PY) -m pytest tests

test-swift: $(DEV)
	$(PY) $(SWIFT_RESOURCES)
	cd app/swift && $(SWIFT) build --build-tests && $(SWIFT) test

coreml: $(DEV)
	$(STARFLOW) export-coreml $(COREML_MODEL) --out $(COREML_OUT) $(COREML_FLAGS)

coreml-check: $(DEV)
	$(PY) scripts/coreml_check.py

bench: $(DEV)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info app/swift/.build app/swift/Tests/Resources/generated
