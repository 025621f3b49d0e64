# Two commands for a newcomer: `make demo` (the main job on the embedded data) and `make test`.
# Each creates or reuses the virtual environment .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export CODECARBON_LOG_LEVEL := error

.PHONY: demo simulate test venv clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# The CPU build of torch first (it lies on this machine's disk), then the project.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[ml,data,test]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/collafuse demo --out runs/demo

simulate: $(VENV)/.installed
	$(VENV)/bin/collafuse simulate --clients 3 --cut-ratio 0.6 --image-size 32 --steps 800 --batch-size 16 --out runs/simulate

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
