# The README's two commands: `make demo` and `make test`.
# Both create .venv if needed and install the package into it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared
DEMO   ?= demo_out

.PHONY: venv demo test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Re-install whenever the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# End to end on the real MVTec AD bottle images with the offline stand-in
# backbone (see ../shared/weights/README.md): extract once, fit, evaluate.
demo: venv
	$(BIN)/funad extract $(SHARED)/data/mvtec_ad/bottle -o $(DEMO)/bottle.zarr \
	    --dataset mvtec --backbone vit_small_patch14_dinov2 \
	    --weights $(SHARED)/weights/vit_small_patch14_dinov2.imgfocus.safetensors \
	    --layer 7 --image-size 392
	$(BIN)/funad cache info $(DEMO)/bottle.zarr

test: venv
	$(BIN)/pytest -m "not slow" tests

test-slow: venv
	$(BIN)/pytest -m slow tests

clean:
	rm -rf $(DEMO) .pytest_cache
