# Two commands are the whole set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench-quick clean zoo zoo-doc

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so no CUDA build is pulled in by a looser requirement
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet tensorflow-cpu==2.21.0 onnx==1.17.0 onnxruntime-training-cpu==1.19.2
	$(PY) -m pip install --quiet -e '.[all,keras-cpu,dev]'
	# keras-hub needs tensorflow-text, which pulls full tensorflow beside tensorflow-cpu: install it
	# without dependencies, plus the runtime needs a random-initialised backbone has (docs/keras.md)
	$(PY) -m pip install --quiet --no-deps keras-hub==0.32.0 kagglehub==1.0.2 kagglesdk==0.1.28
	touch $(STAMP)
	@# the install writes a few GB: flush them to disk now, so that the kernel's writeback does not
	@# compete with the first test run for the two cores
	sync

demo: $(STAMP)
	$(VENV)/bin/gd demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy gd_core

# one pytest worker per core (at most 4; each single-threaded, tests/conftest.py); a worker
# that runs out of tests takes half of another's queue (--dist worksteal), so the workers end
# together instead of one waiting for the other's last long tests
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
TEST_DIST ?= --dist worksteal

test: lint
	@# pytest exits 5 when it collects no tests: that is a failure here too
	$(PY) -m pytest -q -n $(TEST_JOBS) $(TEST_DIST); rc=$$?; if [ $$rc -eq 5 ]; then echo 'no tests collected' >&2; exit 1; fi; exit $$rc

# the full zoo sweep (docs/zoo.md): every transformers class whose tiny config builds offline,
# in ZOO_JOBS processes; fails when an outcome differs from tests/zoo/sweep.json
ZOO_JOBS ?= $(TEST_JOBS)
zoo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m tests.zoo.report --check --jobs $(ZOO_JOBS)
	@# every keras_hub backbone the generic tiny arguments build (docs/zoo-keras.md)
	GD_ZOO=all $(PY) -m pytest -q -n $(TEST_JOBS) tests/keras/test_hub_zoo.py

# regenerate docs/zoo.md and tests/zoo/sweep.json (after a fix flips an outcome)
zoo-doc: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m tests.zoo.report --jobs $(ZOO_JOBS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) $(TEST_DIST) -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
