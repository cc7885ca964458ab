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
# DTYPE empty: each command's default (generate: bfloat16 on a GPU backend, float32 on the CPU
# backend; convert: float32)
DTYPE    ?=
# the companions `make convert` adds, so OUT is a model `starflow generate` runs; empty: flow only
TEXT_ENCODER ?= ckpts/flan-t5-xl
VAE          ?= ckpts/sd-vae-ft-ema
DECODER      ?=
# Core ML
COREML_MODEL ?= weights/demo
COREML_OUT   ?= weights/coreml/$(notdir $(COREML_MODEL))
COREML_FLAGS ?=
# e.g. --units CPU_ONLY CPU_AND_GPU --export build/coreml-check (see scripts/coreml_check.py --help)
COREML_CHECK_FLAGS ?=
# demo model training (Linux development may set BLAS_PRELOAD to a fast BLAS, see README)
DEMO_DATA    ?= build/demo-data
DEMO_RUN     ?= build/demo-run
# Linux: BLAS=openblas preloads Debian's OpenBLAS (apt-get install libopenblas0-pthread), or
# BLAS_PRELOAD=path any BLAS library, for demo-model, bench and rehearsal
BLAS         ?=
OPENBLAS_LIB ?= /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
BLAS_PRELOAD ?= $(if $(filter openblas,$(BLAS)),$(OPENBLAS_LIB))
# bench: ONLY=<sections> (deep overheads jacobi batch sampling editing memory precision), BENCH_FLAGS for
# benchmarks/run.py (e.g. --width 1024 --layers 1 for a quick run)
ONLY         ?=
BENCH_FLAGS  ?=
# rehearsal
SIZE      ?= 64
REHEARSAL ?= build/rehearsal
NICE      ?= 19
SWIFT_RESOURCES := app/swift/Tests/Resources/make_test_resources.py

.PHONY: setup test test-python test-swift demo demo-model generate convert coreml coreml-check bench rehearsal clean

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
	$(STARFLOW) generate "$(PROMPT)" --model $(MODEL) $(if $(DTYPE),--dtype $(DTYPE))

demo-model: $(BASE)
	$(STARFLOW) demo-data $(DEMO_DATA) --count 12000 --seed 0 --force
	$(if $(BLAS_PRELOAD),LD_PRELOAD=$(BLAS_PRELOAD)) $(STARFLOW) train $(DEMO_DATA) --config configs/demo.yaml --out $(DEMO_RUN) --force \
		--steps 3000 --batch-size 32 --lr 1e-3 --min-lr 1e-5 --warmup-steps 200 --grad-clip 1.0 --seed 0 \
		--heldout 0.05 --checkpoint-every 500 --sample-every 500
	rm -rf weights/demo
	cp -RL $(DEMO_RUN)/model weights/demo

convert: $(BASE)
	$(STARFLOW) convert $(CKPT) --config $(CONFIG) --out $(OUT) $(if $(DTYPE),--dtype $(DTYPE)) \
		$(if $(TEXT_ENCODER),--text-encoder $(TEXT_ENCODER)) $(if $(VAE),--vae $(VAE)) $(if $(DECODER),--decoder $(DECODER))

test: test-python test-swift

test-python: $(DEV)
	$(PY) -m pytest tests

test-swift: $(DEV)
	$(PY) $(SWIFT_RESOURCES)
	cd app/swift && $(SWIFT) build --build-tests && $(SWIFT) test

coreml: $(DEV)
	$(STARFLOW) export-coreml $(COREML_MODEL) --out $(COREML_OUT) $(COREML_FLAGS)

coreml-check: $(DEV)
	$(PY) scripts/coreml_check.py $(COREML_CHECK_FLAGS)

bench: $(DEV)
	@test -z "$(BLAS_PRELOAD)" -o -f "$(BLAS_PRELOAD)" || { echo "make bench: $(BLAS_PRELOAD) is missing; install it with: apt-get install libopenblas0-pthread (or set BLAS_PRELOAD to your BLAS library)" >&2; exit 2; }
	$(if $(BLAS_PRELOAD),LD_PRELOAD=$(BLAS_PRELOAD)) $(PY) -m benchmarks.run $(foreach section,$(ONLY),--only $(section)) $(BENCH_FLAGS)

# A developer tool, not part of `make test`: the first run at full size on synthetic weights
# (about 20 GB of files and up to ~21 GB of memory; see the README's "Full-size rehearsal").
# SIZE=256 samples the full 1024-token image; BLAS=openblas as for bench; NICE=0 on a busy machine.
rehearsal: $(BASE)
	$(if $(BLAS_PRELOAD),LD_PRELOAD=$(BLAS_PRELOAD)) nice -n $(NICE) $(PY) scripts/rehearsal.py --size $(SIZE) --out $(REHEARSAL)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info app/swift/.build app/swift/Tests/Resources/generated
