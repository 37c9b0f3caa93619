# Two commands do all set-up on a fresh machine (README):
#   make toy     - install, then run stages 0-5 on the toy preset into runs/toy (stage 0: the toy
#                  world, then the prompt stage), and set the run beside the documented draws of
#                  the world (docs/draws.json): the same world and figures as one, or a draw of its own
#   make test    - install, then run the test suite (pytest, one worker per core; make test-slow
#                  runs the real-size sd15 tests)
# and, after make toy, on the same run folder:
#   make figures - the paper's two ablations: a lambda sweep (Fig. 4A) and SPO without DFM (Fig. 5)
#   make seeds   - stage 4 (both objectives) again with seeds 1 and 2: mean and spread per figure
#   make dfm     - Fig. 5 where Eq. 10 can measure descent rates: 48 pairs visited ~50 times each,
#                  DFM on/off over three seeds, τ of Eq. 10 at 0.05, 0.2, 0.5 and 1 over three
#                  seeds, smaller augmentation pools, and beside the paper's reading of Eq. 10
#                  the probe's (--dfm-reading probe) over three seeds, into $(RUN)/dfm/
#                  (19 min on 2 cores)
#   make alignguard - AlignGuard: prompt-edited (CoProV2-style) pairs, a LoRA safety expert per harm
#                  category, one LoRA on all of them, the experts merged (Co-Merge and peft's merges),
#                  T2I-SPO on the prompt-edited pairs; then the per-category report
#   make alignguard-seeds - after make alignguard: T2I-SPO on inpainted and on prompt-edited pairs
#                  with seeds 1 and 2, for the spread of the Sec. 3.2 comparison over training seeds
#   make baselines - the paper's comparison: safety filter, SLD (three presets), ESD-u, UCE and RECE,
#                  then stage 5 with Fig. 4B's attacks (jailbreak prompts, SneakyPrompt), ending with Table 2
#   make psa     - PSA: simulated users, the profile-conditioned adapter trained on per-user
#                  preferences, and the per-user evaluation, ending with the per-level table
#   make psa-seeds - after make psa: the adapter with seeds 1 and 2, for seed verdicts of PSA's claims
#   make sdxl    - Appendix E on the toy: stages 0-5 into runs/sdxl on a toy world whose model has
#                  SDXL's architecture (stage 0 --arch sdxl), ending with T2I-SPO against its own base
#   make draws   - the spread over draws of the world: make toy with stage 0's --seed at each of
#                  DRAWS (0 1 2) into DRAWS_DIR/world<seed> (runs/draws; a finished draw is kept),
#                  then per draw the headline figures, the targets and stage 5's verdicts, and each
#                  over the draws with its t interval, in DRAWS_DIR/draws.md (systems/draws.py)
PYTHON ?= python3
VENV ?= .venv
RUN ?= runs/toy
XL_RUN ?= runs/sdxl
WORLD_FLAGS ?=
DRAWS ?= 0 1 2
DRAWS_DIR ?= runs/draws
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

# Independent stage-4 runs go side by side, half the cores each: a toy model uses two cores
# far from twice as well as one (BENCHMARKS.md), so two runs at once finish sooner than in turn.
# The toy's trainers set their own thread count (--threads: one for stage 4, as on 2 cores), so
# that their results do not follow the machine's cores; HALF bounds only what they leave unset.
HALF_CORES := $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 1 ? n / 2 : 1 )))
HALF = OMP_NUM_THREADS=$(HALF_CORES) $(PY)
STAGE4 = $(HALF) 04_train_spo.py --run $(RUN)
PAIR = $(MAKE) --no-print-directory -j2

SEED_RUNS := seed-spo-1 seed-safety-1 seed-spo-2 seed-safety-2

# dfm-<setting>-<seed>: the DFM study's runs, longest first so that two at a time finish together;
# τ = 0.2 (the preset's, the on runs), the τ sweep of Fig. 5 left, and beside the paper's reading
# of Eq. 10 (each visit's loss) the one chosen on seed 0: the loss at a (t, ε) fixed per pair
DFM_TAUS := 0.05 0.5 1
DFM_RUNS := dfm-probe-0 dfm-probe-1 dfm-probe-2 dfm-on-0 dfm-on-1 dfm-on-2 \
	$(foreach t,$(DFM_TAUS),$(foreach s,0 1 2,dfm-tau$(t)-$(s))) dfm-pool2-0 dfm-pool1-0 dfm-off-0 dfm-off-1 dfm-off-2
DFM_STUDY := --pair-subset 48 --steps 150 --dfm-k 5 --dfm-patience 2
DFM_on :=
DFM_probe := --dfm-reading probe
DFM_off := --dfm off
DFM_pool1 := --dfm-augmentations color_jitter
DFM_pool2 := --dfm-augmentations color_jitter latent_noise_erase
$(foreach t,$(DFM_TAUS),$(eval DFM_tau$(t) := --dfm-tau $(t)))

# AlignGuard: experts (category words joined by _), its LoRA settings (rank 4 on the attention
# projections, the safe image always wins, no DFM, Eq. 5 without T2I-SPO's winner term as its
# Diffusion-DPO code trains), and the merges, Co-Merge first
AG_CATEGORIES := sexual violence hate harassment self-harm shocking illegal_activity
AG_EXPERTS := $(AG_CATEGORIES:%=expert-%)
AG_MERGES := comerge linear ties dare_ties cat svd
AG_LORA := --data coprov2 --objective safe-wins --lora-rank 4 --dfm off --dpop 0 --lr 3e-4 --warmup 10
AG_EXPERT_STEPS := 60
AG_ALL_STEPS := 420
PROMPTEDIT_SEEDS := spo-promptedit-1 spo-promptedit-2

# PSA's adapter again with training seeds 1 and 2 (make psa-seeds), one after the other: each
# trains on the two threads the toy preset gives the adapter, as seed 0 does
PSA_SEEDS := psa-seed-1 psa-seed-2

# The paper's other Table 2 methods, longest first (RECE is systems/rece.py's), and the number of prompts
# each attack of Fig. 4B writes
BASELINES := esd-u filter rece uce sld
ATTACK_PROMPTS := 32

.PHONY: toy sdxl draws test test-slow figures seeds dfm alignguard alignguard-seeds baselines psa psa-seeds $(PSA_SEEDS) $(BASELINES:%=baseline-%) install stage4-spo stage4-safety fig-lam0 fig-lam0.5 fig-lam2 fig-nodfm \
	$(SEED_RUNS) $(DFM_RUNS) spo-promptedit all-single $(AG_EXPERTS) $(AG_MERGES:%=merge-%) $(PROMPTEDIT_SEEDS)

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

# The test files run side by side, one per core and one thread each (most of a test is starting
# Python and the stages' subprocesses, which one process at a time leaves the other core idle for)
NCORES := $(shell nproc 2>/dev/null || echo 2)
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(NCORES) --dist loadfile -m "not slow" tests

# The sd15 architectures at real size with random weights (tests/test_real_size.py, marked slow:
# about 3 minutes of CPU and 12 GiB of memory), apart from make test to keep CI within 20 minutes
test-slow: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow tests

toy: install
	$(PY) 00_toy_world.py --run $(RUN) $(WORLD_FLAGS)
	$(PY) 00_curate_prompts.py --run $(RUN)
	$(PY) 01_build_coarse.py --run $(RUN)
	$(PY) 02_train_scm.py --run $(RUN)
	$(PY) 03_build_hf.py --run $(RUN)
	$(PAIR) stage4-spo stage4-safety
	$(PY) 05_evaluate.py --run $(RUN)
	$(PY) -m systems.draws place --run $(RUN)

# Appendix E on the toy: the whole pipeline on a toy world whose model has SDXL's architecture
sdxl:
	$(MAKE) toy RUN=$(XL_RUN) WORLD_FLAGS="--arch sdxl"

# A draw of the world per stage-0 seed (the later stages keep their own seeds); a draw whose
# stage 5 has finished is kept as it is, a killed one resumes
draws: install
	for s in $(DRAWS); do \
		if [ -f $(DRAWS_DIR)/world$$s/eval/metrics.json ]; then echo "draw $$s: $(DRAWS_DIR)/world$$s is finished"; \
		else $(MAKE) --no-print-directory toy RUN=$(DRAWS_DIR)/world$$s WORLD_FLAGS="--seed $$s" || exit 1; fi; \
	done
	$(PY) -m systems.draws table --runs $(DRAWS:%=$(DRAWS_DIR)/world%) --out $(DRAWS_DIR)/draws.md \
		--json $(DRAWS_DIR)/draws.json

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

dfm: install
	$(PAIR) $(DFM_RUNS)
	$(PY) 05_evaluate.py --run $(RUN)

$(DFM_RUNS): install
	$(HALF) -m systems.dfm_study train --run $(RUN) $(DFM_STUDY) $(DFM_$(word 2,$(subst -, ,$@))) --seed $(word 3,$(subst -, ,$@)) \
		--name dfm/$(word 2,$(subst -, ,$@))_seed$(word 3,$(subst -, ,$@))

# longest first, so that two at a time finish together
alignguard: install
	$(PY) 03_build_hf.py --run $(RUN) --pairing prompt-edit --name coprov2 --reuse-images hf
	$(PAIR) spo-promptedit all-single $(AG_EXPERTS)
	$(PAIR) $(AG_MERGES:%=merge-%)
	$(PY) 05_evaluate.py --run $(RUN)

spo-promptedit: install
	$(STAGE4) --data coprov2 --name spo_promptedit

all-single: install
	$(STAGE4) $(AG_LORA) --steps $(AG_ALL_STEPS) --name all_single

$(AG_EXPERTS): install
	$(HALF) -m systems.alignguard expert --run $(RUN) $(AG_LORA) --steps $(AG_EXPERT_STEPS) --categories "$(subst _, ,$(@:expert-%=%))" \
		--name expert_$(@:expert-%=%)

$(AG_MERGES:%=merge-%): install
	$(HALF) -m systems.alignguard merge --run $(RUN) --merge-experts $(AG_CATEGORIES:%=expert_%) --merge-method $(@:merge-%=%)

# spo-promptedit-<seed>: T2I-SPO on the prompt-edited pairs with another training seed, beside
# seed-spo-<seed> on the inpainted ones (stage 5 reports each figure's spread over the seeds)
alignguard-seeds: install
	$(PAIR) seed-spo-1 seed-spo-2 $(PROMPTEDIT_SEEDS)
	$(PY) 05_evaluate.py --run $(RUN)

$(PROMPTEDIT_SEEDS): install
	$(STAGE4) --data coprov2 --seed $(@:spo-promptedit-%=%) --name spo_promptedit_seed$(@:spo-promptedit-%=%)

# The paper's other Table 2 methods (systems/baselines.py) into $(RUN)/baselines/, Fig. 4B's attacks
# into $(RUN)/attacks/ (the jailbreak prompts, systems/attacks.py; SneakyPrompt against the filter,
# systems/sneakyprompt.py), then stage 5
baselines: install
	$(PAIR) $(BASELINES:%=baseline-%)
	$(PY) -m systems.attacks jailbreak --run $(RUN) --prompts $(ATTACK_PROMPTS)
	$(PY) -m systems.sneakyprompt search --run $(RUN) --prompts $(ATTACK_PROMPTS)
	$(PY) 05_evaluate.py --run $(RUN)

$(filter-out baseline-rece,$(BASELINES:%=baseline-%)): install
	$(HALF) -m systems.baselines build --run $(RUN) --baseline $(@:baseline-%=%)

baseline-rece: install
	$(HALF) -m systems.rece build --run $(RUN)

# PSA: the simulated users, the adapter (systems/psa.py), the per-user report (systems/psa_eval.py, in stage 5)
psa: install
	$(PY) -m systems.psa users --run $(RUN)
	$(PY) -m systems.psa train --run $(RUN)
	$(PY) 05_evaluate.py --run $(RUN)

# after make psa: the adapter with two more training seeds, for the seed verdicts of PSA's claims
psa-seeds: install
	$(MAKE) --no-print-directory $(PSA_SEEDS)
	$(PY) 05_evaluate.py --run $(RUN)

$(PSA_SEEDS): install
	$(PY) -m systems.psa train --run $(RUN) --seed $(@:psa-seed-%=%) --name psa_seed$(@:psa-seed-%=%)
