# The README's two commands: `make demo` and `make test`.
# Both create .venv if needed and install the package into it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared
DEMO   ?= demo_out

.PHONY: venv demo test test-slow bench bench-quality clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Re-install whenever the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# End to end on the real MVTec AD bottle images with the offline stand-in
# backbone (see ../shared/weights/README.md): extract once (resumes if
# interrupted), fit FUN-AD with 10% of the test anomalies mixed unlabelled into
# training, and evaluate on the rest. Open $(DEMO)/report/overview.png.
# fp32, not --precision auto: every figure in BENCHMARKS.md was extracted in fp32,
# and auto picks bf16 on CPUs with AVX512-BF16/AMX (some of this project's
# machines have them, some do not), which would change the demo's numbers.
WEIGHTS := $(SHARED)/weights/vit_small_patch14_dinov2.imgfocus.safetensors

demo: venv
	@test -d $(SHARED)/data/mvtec_ad/bottle || { echo "demo needs $(SHARED)/data beside the checkout (set SHARED=...)"; exit 1; }
	$(BIN)/funad extract $(SHARED)/data/mvtec_ad/bottle -o $(DEMO)/bottle.zarr \
	    --dataset mvtec --backbone vit_small_patch14_dinov2 --weights $(WEIGHTS) \
	    --layer 7 --image-size 392 --precision fp32
	$(BIN)/funad cache info $(DEMO)/bottle.zarr
	@# Fit once; an interrupted fit resumes, a finished one is kept.
	@if [ -f $(DEMO)/model/model.safetensors ]; then echo "$(DEMO)/model is already fitted (rm -r it to re-fit)"; \
	else $(BIN)/funad fit $(DEMO)/bottle.zarr -o $(DEMO)/model --contamination 0.1 --no-overlap \
	    $$([ -f $(DEMO)/model/config.json ] && echo --resume); fi
	$(BIN)/funad eval $(DEMO)/model -o $(DEMO)/report

test: venv
	$(BIN)/pytest -m "not slow" tests

test-slow: venv
	$(BIN)/pytest -m slow tests

# Speed benchmarks (short runs; each prints markdown with its machine and command).
bench: venv
	$(BIN)/python benchmarks/bench_extract.py > benchmarks/results/extract.md
	$(BIN)/python benchmarks/bench_fit.py --presets paper,paper+bf16,fast,fast+bf16 > benchmarks/results/fit.md
	$(BIN)/python benchmarks/bench_fit.py --n 1000 --presets fast > benchmarks/results/scale.md
	$(BIN)/python benchmarks/bench_nn.py >> benchmarks/results/fit.md
	$(BIN)/python benchmarks/bench_residency.py > benchmarks/results/fit-pipeline.md
	$(BIN)/python benchmarks/bench_predict.py > benchmarks/results/predict.md
	$(BIN)/python benchmarks/bench_eval.py > benchmarks/results/evaluation.md
	$(BIN)/python benchmarks/bench_cache.py > benchmarks/results/cache.md
	$(BIN)/python benchmarks/assemble.py

# Quality grid on ../shared/data (see the script for the full grid's variables).
bench-quality: venv
	bash benchmarks/quality.sh
	$(BIN)/python benchmarks/assemble.py

clean:
	rm -rf $(DEMO) .pytest_cache
