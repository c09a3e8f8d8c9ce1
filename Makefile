# structexport: set up, demo and test from a fresh clone with nothing but python3 on PATH.
#
#   make demo        set up .venv, then run the main job on the bundled model
#   make test        set up .venv, then run the default (fast) test tier
#   make test-slow   the slow tier (pytest -m slow)
#   make clean       remove build outputs and caches (make distclean also removes .venv)

PYTHON  ?= python3
VENV    ?= .venv
EXTRAS  ?= test,tvm,executorch,litert
# The litert extra's converter, installed without its declared dependencies: they pull xdsl,
# which pins typing_extensions<4.13 and breaks `import tvm` (docs/litert.md). Nothing they
# leave out is imported on the convert/run path.
LITERT_NODEPS ?= litert-torch==0.10.0 litert-converter==0.5.0
VPY     := $(VENV)/bin/python

# The install is redone only when pyproject.toml (or the extras, or the no-deps pins) change:
# the stamp's name carries a hash of them, so a re-run with an up-to-date .venv skips pip entirely.
INSTALL_HASH := $(shell $(PYTHON) -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read() + b'$(EXTRAS) $(LITERT_NODEPS)').hexdigest()[:16])" 2>/dev/null)
STAMP   := $(VENV)/.installed-$(INSTALL_HASH)

# The main job on the bundled default model: convert it for ONNX Runtime on CPU, verified.
DEMO_CKPT ?= models/checkpoints/resnet20-csg-16x16x3x3-72.t7
DEMO_OUT  ?= out/demo
DEMO_CMD  ?= $(VENV)/bin/structexport convert $(DEMO_CKPT) --arch resnet20 --target ort-cpu -o $(DEMO_OUT)

PYTEST_ARGS ?=

.PHONY: help setup demo test test-slow clean distclean
.DEFAULT_GOAL := help

help:
	@echo "make demo       set up .venv and run: $(DEMO_CMD)"
	@echo "make test       set up .venv and run the default test tier"
	@echo "make test-slow  run the slow test tier (pytest -m slow)"
	@echo "make setup      create .venv and install the package with [$(EXTRAS)] (skipped when current)"
	@echo "make clean      remove build outputs and caches; make distclean also removes .venv"

setup: $(STAMP)

$(STAMP):
	@test -n "$(INSTALL_HASH)" || { echo "error: '$(PYTHON)' cannot run (need Python >= 3.10 on PATH as $(PYTHON))" >&2; exit 1; }
	@test -x $(VPY) || { echo "creating $(VENV) with $$($(PYTHON) --version 2>&1)"; $(PYTHON) -m venv $(VENV); }
	$(VPY) -m pip install --disable-pip-version-check --progress-bar off -e '.[$(EXTRAS)]'
	@case ',$(EXTRAS),' in *,litert,*) \
	  echo "$(VPY) -m pip install --no-deps $(LITERT_NODEPS)"; \
	  $(VPY) -m pip install --disable-pip-version-check --progress-bar off --no-deps $(LITERT_NODEPS) || exit 1;; \
	esac
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(DEMO_CMD)

# pytest takes its options (test paths, markers, `-m 'not slow'`) from pyproject.toml.
# Exit code 5 (no tests collected) is a failure, never a pass.
test: setup
	@$(VPY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (exit code 5)" >&2; fi; \
	exit $$rc

test-slow: setup
	@$(VPY) -m pytest -q -m slow $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no slow tests (exit code 5)" >&2; fi; \
	exit $$rc

clean:
	rm -rf build dist .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
