# CXR-LT 2026 submission pipeline.  `make help` lists the targets and variables.
#
#   image caches -> backbone training -> head re-training (cRT) -> TTA inference (val + test)
#   -> evaluation on the val fold -> ensemble -> validated submission CSV (+ zip)
#
# `make all` is always right: every stage is a real file target that depends on its upstream
# outputs and on a content stamp of everything else it reads (config keys of its group, input
# CSV contents, the Make variables it uses). The stamps are written by cxrlt/pipeline/plan.py, which runs
# at the start of every make (the rule for $(STATE)/vars.mk) and rewrites a stamp only when its
# content changes. A stage that runs and finds its output already built from the same inputs only
# touches it, so a second `make all` has nothing to do. docs/pipeline.md: "What re-runs when you change X".
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
MAKEFLAGS += --warn-undefined-variables --no-builtin-rules

# ---- user-facing variables (override on the command line: make all NAME=try2 ...) ----------
DATASET     ?= cxrlt2026#                            names the cache and run folders
DATA_DIR    ?= data/cxrlt2026#                       where the official download lives
TRAIN_CSV   ?= $(DATA_DIR)/train.csv#                training CSV (ImageID,StudyDate_DICOM,PatientID,labels...)
IMAGE_DIR   ?= $(DATA_DIR)/images#                   folder of the PNGs named by ImageID
TEST_CSV    ?= $(DATA_DIR)/CXRLT_2026_TEST_ALL_TASK1.csv#  the list of images to predict
REMOVAL_CSV ?= $(DATA_DIR)/Removal.csv#              optional: images excluded from training
META_CSV    ?=#                                      optional: PadChest's metadata CSV (exact patient, study, projection)
LABELS_FILE ?=#                                      optional: the label set, one a line (default: the training CSV's columns)
TEST_LABELS ?=#                                      optional: labels for TEST_CSV; then `make all` scores the submission
IMG_SIZE    ?= 512#                                  square side of the cached images (a config's img_size overrides it)
FOLDS       ?= 5#                                    patient-grouped folds in the train cache
CONFIGS     ?= configs/paper_ldam_drw.yaml#          one or more training configs (ensembled)
NAME        ?= $(DATASET)#                           the submission's name: $(SUB_DIR)/$(NAME).csv
ENSEMBLE    ?= mean#                                 mean | rank | weighted | greedy
TRAIN_ARGS  ?=#                                      config overrides for every stage of every config (e.g. --epochs 3)
PREDICT_ARGS ?=#                                     extra flags for predict.py (e.g. --tta flip_scale)
PREPROCESS_ARGS ?=#                                  extra flags for preprocess.py (e.g. --skip-bad)
LOGGER      ?= none#                                 experiment trackers for training: none | tensorboard | wandb | mlflow (comma-separated; docs/tracking.md)
POSTPROC    ?= off#                                  off | auto: apply the post-processing chosen on val (when its honest gain is positive)
NPROC       ?= 1#                                    processes (GPUs) per node: >1 runs train.py under torchrun (DDP)
NNODES      ?= 1#                                    nodes for training (torchrun); run `make train` on every node
NODE_RANK   ?= 0#                                    this node's rank, 0..NNODES-1
MASTER_ADDR ?= 127.0.0.1#                            address of node 0 (rendezvous), when NNODES > 1
MASTER_PORT ?= 29500#                                port on node 0 (rendezvous)
CACHE_ROOT  ?= data/cache#                           image caches: $(CACHE_ROOT)/$(DATASET)_<size>/{train,test-<key>}
RUNS_ROOT   ?= runs#                                 run folders: $(RUNS_ROOT)/$(DATASET)_<size>/<config>
SUB_DIR     ?= submissions#                          where submissions are written
STATE       ?= .make#                                Make's stamps and generated variables
PYTHON      ?= python3#                              interpreter used to create the virtualenv
VARIABLES := DATASET DATA_DIR TRAIN_CSV IMAGE_DIR TEST_CSV REMOVAL_CSV META_CSV LABELS_FILE TEST_LABELS \
	IMG_SIZE FOLDS CONFIGS NAME ENSEMBLE TRAIN_ARGS PREDICT_ARGS PREPROCESS_ARGS LOGGER POSTPROC NPROC NNODES \
	NODE_RANK MASTER_ADDR MASTER_PORT CACHE_ROOT RUNS_ROOT SUB_DIR STATE PYTHON

# ---- enumerated variables: a value outside the list stops every make, naming the variable ----------
# $(call check_enum,VAR,allowed words): one word (or empty: the default applies);
# $(call check_enum_list,VAR,allowed words): several, separated by spaces or commas. Every variable
# with a fixed set of values is checked here or at its definition in mk/*.mk (tests/test_make_variables.py
# finds them by their `a | b` comment and keeps the lists equal to the scripts' own).
enum_comma := ,
enum_words = $(strip $(subst $(enum_comma), ,$($(1))))
check_enum = $(if $(or $(filter-out $(2),$(call enum_words,$(1))),$(word 2,$(call enum_words,$(1)))),\
	$(error $(1)=$($(1)): expected one of $(2)))
check_enum_list = $(if $(filter-out $(2),$(call enum_words,$(1))),\
	$(error $(1)=$($(1)): $(filter-out $(2),$(call enum_words,$(1))) is not one of $(2)))
# variables naming one file, folder or name: a space would make Make split them into several words
enum_empty :=
enum_space := $(enum_empty) $(enum_empty)
check_one_word = $(if $(findstring $(enum_space),$($(1))),$(error $(1)='$($(1))' contains a space: Make splits it \
	into several words; rename or link the path without spaces))
$(foreach v,DATASET DATA_DIR TRAIN_CSV IMAGE_DIR TEST_CSV REMOVAL_CSV META_CSV LABELS_FILE TEST_LABELS NAME \
	CACHE_ROOT RUNS_ROOT SUB_DIR STATE,$(call check_one_word,$(v)))
$(call check_enum,POSTPROC,off auto)
$(call check_enum,ENSEMBLE,mean rank weighted greedy)
$(call check_enum_list,LOGGER,none tensorboard wandb mlflow)

# ---- derived ---------------------------------------------------------------------------------
# every variable's value, for NAME.json (ensemble.py --make-var)
MAKE_VARS = $(foreach v,$(VARIABLES),--make-var '$(v)=$(subst ','\'',$($(v)))')
VENV := .venv
PY   ?= $(VENV)/bin/python
SUB  := $(SUB_DIR)/$(NAME)
opt   = $(if $(2),$(1) $(2),)
REMOVAL_ARG := $(if $(wildcard $(REMOVAL_CSV)),--removal-csv $(REMOVAL_CSV),)
META_ARG    := $(call opt,--meta-csv,$(META_CSV))
LABELS_ARG  := $(call opt,--labels-file,$(LABELS_FILE))
ifeq ($(NNODES),1)
  ifeq ($(NPROC),1)
    TRAIN_CMD := $(PY) train.py
  else
    TRAIN_CMD := $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py
  endif
else
  TRAIN_CMD := $(VENV)/bin/torchrun --nnodes=$(NNODES) --node_rank=$(NODE_RANK) --nproc_per_node=$(NPROC) \
	--master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT) train.py
endif

DEMO_DIR := data/demo
DEMO_VARS := DATASET=demo DATA_DIR=$(DEMO_DIR) TRAIN_CSV=$(DEMO_DIR)/train.csv \
	IMAGE_DIR=$(DEMO_DIR)/images TEST_CSV=$(DEMO_DIR)/CXRLT_2026_TEST_ALL_TASK1.csv \
	REMOVAL_CSV=$(DEMO_DIR)/Removal.csv TEST_LABELS=$(DEMO_DIR)/test_labels.csv \
	META_CSV=$(DEMO_DIR)/padchest_metadata.csv \
	IMG_SIZE=64 CONFIGS="configs/demo.yaml configs/demo_db_cas.yaml" NAME=demo POSTPROC=auto ENSEMBLE=greedy

.PHONY: help all demo demo-data test test-fast bench gpu-check preprocess train crt predict evaluate submission \
	clean-demo clean show-plan venv runs FORCE

help: ## show this help
	@echo "CXR-LT 2026 pipeline. Usage: make <target> [VAR=value ...]"
	@echo
	@on=; off=; if [ -t 1 ]; then on=$$'\033[36m'; off=$$'\033[0m'; fi; \
		grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk -v on="$$on" -v off="$$off" 'BEGIN {FS = ":.*?## "}; {printf "  %s%-12s%s %s\n", on, $$1, off, $$2}'
	@echo
	@echo "Variables (current value):"
	@$(foreach v,$(VARIABLES),printf "  %-16s %s\n" "$(v)" "$($(v))";)

# ---- environment -----------------------------------------------------------------------------
venv: $(VENV)/.installed ## create .venv and install requirements (automatic for every target)

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	touch $@

# ---- demo and tests --------------------------------------------------------------------------
demo-data: $(DEMO_DIR)/train.csv ## write the synthetic demo dataset to data/demo/

$(DEMO_DIR)/train.csv: | $(VENV)/.installed
	$(VENV)/bin/python -m cxrlt.synth --out $(DEMO_DIR)

demo: $(VENV)/.installed $(DEMO_DIR)/train.csv ## run the whole pipeline on the demo dataset (CPU, minutes)
	$(MAKE) --no-print-directory all $(DEMO_VARS)

test: $(VENV)/.installed ## lint (ruff) and run the whole test suite (what CI runs)
	$(VENV)/bin/ruff check --quiet .
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n 2 --durations=15 tests

test-fast: $(VENV)/.installed ## the test suite without the slow tests (a developer's loop)
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n 2 -m "not slow" tests

bench: $(VENV)/.installed ## run the benchmarks, print a table, write bench/results.md
	$(VENV)/bin/python bench/run_all.py

gpu-check: $(VENV)/.installed ## on one GPU, ~5 min: MFU, data wait, checkpoint stall, predict/cRT rates, 768 px memory, bf16 head (bench/gpu_check.jsonl; docs/gpu.md)
	$(VENV)/bin/python bench/gpu_check.py --out bench/gpu_check.jsonl

runs: | $(VENV)/.installed ## one table of every run (moved-aside ones too) and submission: epochs, keys, full / proxy / honest val mAP, test mAP
	@$(PY) -m cxrlt.pipeline.runs --runs-root $(RUNS_ROOT) --sub-dir $(SUB_DIR)

clean-demo: ## delete the demo dataset, its caches, runs, study reports and submissions
	rm -rf $(DEMO_DIR) $(CACHE_ROOT)/demo_* $(RUNS_ROOT)/demo_* $(SUB_DIR)/demo.* $(SUB_DIR)/demo_* $(SUB_DIR)/demo@* \
		$(STATE)/demo_* $(REPORTS_DIR)/demo_*

clean: ## delete Make's state ($(STATE)) and Python caches; never data, caches, runs or submissions
	rm -rf $(STATE) .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

show-plan: ## print the variables and stage rules the plan generates for the current variables
	$(info # $(STATE)/vars.mk)
	$(info $(file < $(STATE)/vars.mk))
	$(foreach s,$(SIZES),$(info $(call CACHE_RULES,$(s))))
	$(foreach s,$(STEMS),$(if $(filter $(s),$(BASE_$(s))),$(info $(call TRAIN_RULE,$(s)))))
	$(foreach s,$(STEMS),$(info $(call RUN_RULES,$(s))))
	@:

# ---- the plan: stamps + per-config variables (runs first, on every pipeline make) -------------
NO_PLAN_GOALS := help venv runs demo demo-data demo-study test test-fast bench gpu-check clean-demo clean demo-task2 pretrain demo-pretrain-data demo-pretrain pseudo-labels
ifneq ($(filter-out $(NO_PLAN_GOALS),$(MAKECMDGOALS)),)
include $(STATE)/vars.mk
endif

$(STATE)/vars.mk: FORCE | $(VENV)/.installed
	@$(VENV)/bin/python -m cxrlt.pipeline.plan --mk $@ --state $(STATE) --dataset '$(DATASET)' \
		--train-csv '$(TRAIN_CSV)' --image-dir '$(IMAGE_DIR)' --test-csv '$(TEST_CSV)' \
		--removal-csv '$(REMOVAL_CSV)' --meta-csv '$(META_CSV)' --labels-file '$(LABELS_FILE)' \
		--test-labels '$(TEST_LABELS)' --img-size '$(IMG_SIZE)' --folds '$(FOLDS)' --configs '$(CONFIGS)' \
		--name '$(NAME)' --ensemble '$(ENSEMBLE)' --postproc '$(POSTPROC)' --train-args='$(TRAIN_ARGS)' \
		--predict-args='$(PREDICT_ARGS)' --preprocess-args='$(PREPROCESS_ARGS)' \
		--stamp='$(DATASET)_zeroshot=$(subst ','\'',$(ZS_INPUTS))' \
		--stamp-inputs='$(DATASET)_zeroshot=$(ZS_PROMPTS) $(TASK2_LABEL_SET)' \
		--stamp-inputs='$(NAME)_score=$(TEST_LABELS)' --stamp-inputs='$(NAME)_task2_score=$(TASK2_LABELS)' \
		--study='$(STUDY_PLAN)' $(DRY_RUN) \
		--explicit='$(foreach v,TRAIN_CSV IMAGE_DIR TEST_CSV REMOVAL_CSV,$(if $(filter command line environment environment override,$(origin $(v))),$(v)))'

FORCE:

# `make -n` still runs the plan (Make remakes included makefiles in a dry run): the plan is told,
# so that the stamps a dry run changes get their old time back (cxrlt/pipeline/stamps.py)
DRY_RUN := $(if $(findstring n,$(filter-out --%,$(firstword -$(MAKEFLAGS)))),--dry-run,)

# ---- stage 1: image caches, one pair per image size --------------------------------------------
# The train cache never depends on the test list; each test list has its own test cache
# (test-$(TEST_KEY), named by the list's content). Both reuse already decoded pixels by ImageID.
define CACHE_RULES
$(CACHE_ROOT)/$(DATASET)_$(1)/train/manifest.json: $(STATE)/$(DATASET)_$(1)/cache-train.stamp | $(VENV)/.installed
	$$(PY) preprocess.py train --train-csv $(TRAIN_CSV) --image-dir $(IMAGE_DIR) $(REMOVAL_ARG) $(META_ARG) \
		$(LABELS_ARG) --size $(1) --folds $(FOLDS) --out $$(@D) $(PREPROCESS_ARGS)

# (order-only on the train cache: its pixels are reused and a test image found in training is refused)
$(CACHE_ROOT)/$(DATASET)_$(1)/test-$(TEST_KEY)/manifest.json: $(STATE)/$(DATASET)_$(1)/cache-test.stamp \
		| $(VENV)/.installed $(CACHE_ROOT)/$(DATASET)_$(1)/train/manifest.json
	$$(PY) preprocess.py test --test-csv $(TEST_CSV) --image-dir $(IMAGE_DIR) $(META_ARG) --size $(1) \
		--out $$(@D) $(PREPROCESS_ARGS)
endef

# ---- stages 2-5, once per config ---------------------------------------------------------------
# R_/C_/S_<stem>: the config's run folder, cache root and stamp folder (by its image size).
define RUN_VARS
R_$(1) := $(RUNS_ROOT)/$(DATASET)_$(SIZE_$(1))/$(1)
C_$(1) := $(CACHE_ROOT)/$(DATASET)_$(SIZE_$(1))
S_$(1) := $(STATE)/$(DATASET)_$(SIZE_$(1))/$(1)
endef

# $(1) = config stem. INIT_<stem> names the run a resolution-ladder config starts from; a config
# whose BASE_<stem> is another stem (same training, other post-training keys) trains nothing and
# re-trains its head on that stem's backbone.
# the tracker packages LOGGER names, installed into the venv when missing (requirements-track.txt)
TRACK_PKG_tensorboard := tensorboard
TRACK_PKG_wandb := wandb
TRACK_PKG_mlflow := mlflow
TRACK_INSTALL = $(foreach t,$(filter-out none,$(subst $(comma), ,$(LOGGER))),$(PY) -c 'import $(TRACK_PKG_$(t))' 2>/dev/null || \
	$(VENV)/bin/pip install -q "$$(grep -E '^$(TRACK_PKG_$(t))' requirements-track.txt)";)
comma := ,

define TRAIN_RULE
$(R_$(1))/model.pt: $(S_$(1))/train.stamp $(C_$(1))/train/manifest.json $(if $(INIT_$(1)),$(R_$(INIT_$(1)))/model.pt) | $(VENV)/.installed
	$$(TRACK_INSTALL)
	$$(TRAIN_CMD) --config $(CFG_$(1)) --cache $(C_$(1))/train --out $(R_$(1)) --resume $(TRAIN_ARGS) \
		$(if $(filter-out none,$(LOGGER)),--logger $(LOGGER)) $(if $(INIT_$(1)),--init_checkpoint $(R_$(INIT_$(1)))/model.pt)
endef

define RUN_RULES
$(R_$(1))/crt/model.pt: $(S_$(1))/crt.stamp $(R_$(BASE_$(1)))/model.pt
	$$(PY) retrain_head.py --run $(R_$(BASE_$(1))) --cache $(C_$(1))/train --out $(R_$(1))/crt --config $(CFG_$(1)) $(TRAIN_ARGS)

$(R_$(1))/pred_val.csv: $(S_$(1))/predict-val.stamp $(R_$(1))/crt/model.pt
	$$(PY) predict.py --checkpoint $(R_$(1))/crt/model.pt --cache $(C_$(1))/train --split val --out $$@ \
		--config $(CFG_$(1)) $(TRAIN_ARGS) $(PREDICT_ARGS) $(if $(filter auto,$(POSTPROC)),--apply-choice)

$(R_$(1))/pred_test.csv: $(S_$(1))/predict-test.stamp $(R_$(1))/crt/model.pt $(C_$(1))/test-$(TEST_KEY)/manifest.json \
		$(if $(filter auto,$(POSTPROC)),$(R_$(1))/pred_val.csv)
	$$(PY) predict.py --checkpoint $(R_$(1))/crt/model.pt --cache $(C_$(1))/test-$(TEST_KEY) --split test --out $$@ \
		--config $(CFG_$(1)) $(TRAIN_ARGS) $(PREDICT_ARGS) \
		$(if $(filter auto,$(POSTPROC)),--postproc-from $(R_$(1))/pred_val.csv.postproc.json)

$(R_$(1))/eval/metrics.json: $(R_$(1))/pred_val.csv
	$$(PY) evaluate.py --pred $$< --labels $(C_$(1))/train/index.csv --out $(R_$(1))/eval \
		--train-log $(R_$(BASE_$(1)))/metrics.jsonl
endef

STEMS ?=
ENSEMBLE_SELECT ?=
SIZES ?=
TEST_KEY ?= none
FIRST ?=
ifneq ($(STEMS),)
$(foreach s,$(SIZES),$(eval $(call CACHE_RULES,$(s))))
$(foreach s,$(STEMS),$(eval $(call RUN_VARS,$(s))))
$(foreach s,$(STEMS),$(if $(filter $(s),$(BASE_$(s))),$(eval $(call TRAIN_RULE,$(s)))))
$(foreach s,$(STEMS),$(eval $(call RUN_RULES,$(s))))
FIRST := $(firstword $(STEMS))
endif

runs_of = $(foreach s,$(STEMS),$(R_$(s))/$(1))
train: $(foreach s,$(STEMS),$(R_$(BASE_$(s)))/model.pt) ## train one backbone per config in CONFIGS (configs that differ only in post-training keys share one)
crt: $(call runs_of,crt/model.pt) ## classifier re-training on each trained run
predict: $(call runs_of,pred_val.csv) $(call runs_of,pred_test.csv) ## TTA predictions (val fold + test list)
evaluate: $(call runs_of,eval/metrics.json) ## metrics, report and plots on the val fold
preprocess: $(foreach s,$(STEMS),$(C_$(s))/train/manifest.json $(C_$(s))/test-$(TEST_KEY)/manifest.json) ## build the image caches (train + test list) for every image size in use

# ---- stage 6: ensemble -> submission -------------------------------------------------------------
$(SUB).csv: $(STATE)/submissions/$(NAME).stamp $(call runs_of,pred_test.csv) $(call runs_of,pred_val.csv) \
		$(call runs_of,eval/metrics.json)
	$(PY) ensemble.py combine --method $(ENSEMBLE) --test $(call runs_of,pred_test.csv) \
		--val $(call runs_of,pred_val.csv) --val-labels $(C_$(FIRST))/train/index.csv $(ENSEMBLE_SELECT) \
		--test-list $(TEST_CSV) --labels-file $(C_$(FIRST))/train/labels.txt --out $@ --zip $(SUB).zip $(MAKE_VARS)

$(SUB).score.json: $(SUB).csv $(STATE)/stamps/$(NAME)_score.stamp
	$(PY) evaluate.py --pred $< --labels $(TEST_LABELS) --out $(SUB)_eval --index $(C_$(FIRST))/train/index.csv
	cp $(SUB)_eval/metrics.json $@.tmp && mv $@.tmp $@

submission: $(SUB).csv ## ensemble the configs' test predictions into $(SUB_DIR)/$(NAME).csv (+ .zip)

all: $(SUB).csv $(if $(TEST_LABELS),$(SUB).score.json) ## everything: caches, train, cRT, predict, evaluate, ensemble, submission
	@echo "submission: $(SUB).csv  (zip: $(SUB).zip)"
	$(if $(TEST_LABELS),@$(PY) -c "import json; m=json.load(open('$(SUB).score.json')); print(f\"test mAP {m['mAP']:.4f}  mAUC {m['mAUC']:.4f}  (scored against $(TEST_LABELS))\")")

# ---- studies and Task 2 -------------------------------------------------------------------------
include mk/studies.mk mk/task2.mk mk/pretrain.mk
