# The two commands of the README:  make demo  |  make test
# Both create .venv if absent and install the project into it (C++ extension included).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel from local disk on our machines; set TORCH_SPEC="torch" (or a CUDA index) on a GPU box.
TORCH_SPEC ?= torch==2.13.0
# the extras `make install` / `make test` install; `make demo` installs the package alone
EXTRAS ?= test,plot,compat
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEMO_STAMP := $(VENV)/.installed-base
NATIVE := setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*)

.PHONY: demo test lint bench install clean
.PRECIOUS: $(VENV)/.installed-%

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade setuptools wheel pybind11
	$(BIN)/pip install "$(TORCH_SPEC)"

# .installed-<extras joined by ->: the package with those extras ("base": none).
$(VENV)/.installed-%: $(BIN)/python $(NATIVE)
	# Pin the torch just installed: otherwise a peer's dependency lets pip swap it for a multi-GB build.
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/pip install -c $(VENV)/constraints.txt --no-build-isolation -e "$(if $(filter base,$*),.,.[$(subst -,$(comma),$*)])"
	# PyPI torchvision (pulled in by a compat peer) fails to import beside CPU torch; nothing needs it.
	$(BIN)/pip uninstall -y -q torchvision 2>/dev/null || true
	touch $@

install: $(STAMP)

# The demo runs fastsae alone (no plots, no peers, no test tools): it installs nothing else.
demo: $(DEMO_STAMP)
	$(BIN)/python -m fastsae demo

lint: install
	$(BIN)/ruff check .

# FASTSAE_REQUIRE_EXTRAS=1: a missing extra (peers, transformers) fails its tests instead of skipping them
test: lint
	FASTSAE_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest -q
	$(MAKE) test-triton36

clean:
	rm -rf build $(VENV) *.egg-info fastsae/_C*.so

# ---------------------------------------------------------------- the GPU machines' versions
# A second, small venv with triton 3.6.0 (what the GPU machines run) in front of the main venv's
# packages (torch, fastsae): the Triton interpreter tests and the sm_90 compile check under it.
T36      := .venv-triton36
T36_PY   := $(T36)/bin/python
T36_STAMP := $(T36)/.installed-triton-3.6.0

$(T36_STAMP): $(STAMP)
	$(PYTHON) -m venv $(T36)
	$(T36)/bin/pip install -q --no-deps triton==3.6.0
	# the main venv's site-packages after this venv's own: its torch and editable fastsae, triton 3.6 first
	$(T36_PY) -c "import site, sys; print(f'import site; site.addsitedir({sys.argv[1]!r})')" \
	  "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  > "$$($(T36_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fastsae-main-venv.pth"
	touch $@

.PHONY: test-triton36 gpu-wheels compile-check cuda-compile-check
# The kernel tests under the interpreter with triton 3.6.0, then the sm_90 compile check (smoke).
test-triton36: $(T36_STAMP)
	$(T36_PY) -c "import triton; assert triton.__version__ == '3.6.0', triton.__version__"
	$(T36_PY) -m pytest -q -p no:cacheprovider tests/ops/test_kernels_topk.py tests/ops/test_kernels_decoder.py \
	  tests/ops/test_kernels_fused_relu.py tests/ops/test_kernels_batchtopk.py tests/ops/test_kernels_chunked.py \
	  tests/ops/test_kernels_fixes.py
	env -u TRITON_INTERPRET $(T36_PY) bench/kernels_sm90_compile.py --smoke --dtype bfloat16 --shape aligned

# The full compile check (every kernel, constexpr variant, dtype and autotune config; slow on 2 cores).
compile-check: install
	env -u TRITON_INTERPRET $(BIN)/python bench/kernels_sm90_compile.py --out bench/results/kernels_sm90_compile.txt

# The wheels bench/gpu_check.sh installs on the GPU machine (no network there): the step
# benchmark's peers and their missing dependencies, cp312; fails if over 55 MiB (slow: not in test).
gpu-wheels: install
	$(BIN)/python -m bench.gpu.wheels --out wheels

# csrc/*.cu compiled for sm_90 with nvcc against the CPU torch's headers (no GPU, no linking).
cuda-compile-check: install
	$(BIN)/python -m bench.gpu.compile_cuda --out bench/results/cuda_sm90_compile.txt
