# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what is missing (Debian GUI libraries too, when run as root).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Our machines hold this torch on local disk; GPU users may pass their own, e.g. TORCH=torch.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= out/demo

# Nothing may reach a model hub at run time.
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

# What napari needs to draw on a machine without a display (Xvfb and Mesa).
GUI_PACKAGES := xvfb xauth libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libdbus-1-3 \
	libfontconfig1 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
	libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1

.PHONY: demo test install system lint clean

# With a display napari opens for you; without one the demo drives itself under Xvfb.
demo: install
	@if [ -n "$$DISPLAY$$WAYLAND_DISPLAY" ]; then \
	  $(BIN)/shortcut-unlearning demo --out $(DEMO_OUT); \
	else \
	  xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/shortcut-unlearning demo --headless --out $(DEMO_OUT); \
	fi

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/npe2 validate shortcut-unlearning
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

install: system $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[gui,test]"
	touch $@

system:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && ! dpkg -s $(GUI_PACKAGES) >/dev/null 2>&1; then \
	  echo "Installing GUI libraries for a headless napari: $(GUI_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $(GUI_PACKAGES) >/dev/null; \
	fi

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache
