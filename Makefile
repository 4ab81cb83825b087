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

clean:
	rm -rf build $(VENV) *.egg-info fastsae/_C*.so
