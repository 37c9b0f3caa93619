# Two commands do all set-up on a fresh machine (README):
#   make toy     - install, then run stages 0-5 on the toy preset into runs/toy
#   make test    - install, then run the test suite
# and, after make toy, on the same run folder:
#   make figures - the paper's two ablations: a lambda sweep (Fig. 4A) and SPO without DFM (Fig. 5)
#   make seeds   - stage 4 (both objectives) again with seeds 1 and 2: mean and spread per figure
PYTHON ?= python3
VENV ?= .venv
RUN ?= runs/toy
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

# Independent stage-4 runs go side by side, half the cores each: a toy model uses two cores
# far from twice as well as one (BENCHMARKS.md), so two runs at once finish sooner than in turn.
HALF_CORES := $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 1 ? n / 2 : 1 )))
STAGE4 = OMP_NUM_THREADS=$(HALF_CORES) $(PY) 04_train_spo.py --run $(RUN)
PAIR = $(MAKE) --no-print-directory -j2

SEED_RUNS := seed-spo-1 seed-safety-1 seed-spo-2 seed-safety-2

.PHONY: toy test figures seeds install stage4-spo stage4-safety fig-lam0 fig-lam0.5 fig-lam2 fig-nodfm $(SEED_RUNS)

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

test: install
	$(PY) -m pytest -q tests

toy: install
	$(PY) 00_toy_world.py --run $(RUN)
	$(PY) 01_build_coarse.py --run $(RUN)
	$(PY) 02_train_scm.py --run $(RUN)
	$(PY) 03_build_hf.py --run $(RUN)
	$(PAIR) stage4-spo stage4-safety
	$(PY) 05_evaluate.py --run $(RUN)

stage4-spo stage4-safety: install
	$(STAGE4) --objective $(@:stage4-%=%)

figures: install
	$(PAIR) fig-lam0 fig-lam0.5 fig-lam2 fig-nodfm
	$(PY) 05_evaluate.py --run $(RUN)

fig-lam0 fig-lam0.5 fig-lam2: install
	$(STAGE4) --name spo_lam$(@:fig-lam%=%) --lam $(@:fig-lam%=%)

fig-nodfm: install
	$(STAGE4) --name spo_nodfm --dfm off

# seed-<objective>-<seed>: the same data and settings, another training seed, into <objective>_seed<seed>
seeds: install
	$(PAIR) seed-spo-1 seed-safety-1
	$(PAIR) seed-spo-2 seed-safety-2
	$(PY) 05_evaluate.py --run $(RUN)

$(SEED_RUNS): install
	$(STAGE4) --objective $(word 2,$(subst -, ,$@)) --seed $(word 3,$(subst -, ,$@)) \
		--name $(word 2,$(subst -, ,$@))_seed$(word 3,$(subst -, ,$@))
