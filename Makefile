# CXR-LT 2026 submission pipeline.  `make help` lists the targets.
#
# Every stage is a real file target, so a second `make` only redoes stale work:
#   image cache -> backbone training -> head re-training (cRT) -> TTA inference (val + test)
#   -> evaluation on the val fold -> ensemble -> validated submission CSV (+ zip)
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
TEST_LABELS ?=#                                      optional: labels for TEST_CSV; then `make all` scores the submission
IMG_SIZE    ?= 512#                                  square side of the cached images
FOLDS       ?= 5#                                    patient-grouped folds in the index
CONFIGS     ?= configs/paper_ldam_drw.yaml#          one or more training configs (ensembled)
NAME        ?= $(DATASET)#                           the submission's name: submissions/$(NAME).csv
ENSEMBLE    ?= mean#                                 mean | rank | weighted | greedy
TRAIN_ARGS  ?=#                                      extra flags for train.py (e.g. --epochs 3)
PREDICT_ARGS ?=#                                     extra flags for predict.py (e.g. --tta flip_scale)
POSTPROC    ?= off#                                  off | auto: apply the normal gating + study pooling chosen on val to the test predictions
NPROC       ?= 1#                                    GPUs per node: >1 runs train.py under torchrun (DDP)
PYTHON      ?= python3#                              interpreter used to create the virtualenv

# ---- derived paths ---------------------------------------------------------------------------
VENV   := .venv
PY     := $(VENV)/bin/python
CACHE  := data/cache/$(DATASET)_$(IMG_SIZE)
RUNS   := runs/$(DATASET)_$(IMG_SIZE)
STEMS  := $(foreach c,$(CONFIGS),$(basename $(notdir $(c))))
SUB    := submissions/$(NAME)
REMOVAL_ARG := $(if $(wildcard $(REMOVAL_CSV)),--removal-csv $(REMOVAL_CSV),)
ifeq ($(NPROC),1)
TRAIN_CMD := $(PY) train.py
else
TRAIN_CMD := $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py
endif

DEMO_DIR := data/demo
DEMO_VARS := DATASET=demo DATA_DIR=$(DEMO_DIR) TRAIN_CSV=$(DEMO_DIR)/train.csv \
	IMAGE_DIR=$(DEMO_DIR)/images TEST_CSV=$(DEMO_DIR)/CXRLT_2026_TEST_ALL_TASK1.csv \
	REMOVAL_CSV=$(DEMO_DIR)/Removal.csv TEST_LABELS=$(DEMO_DIR)/test_labels.csv \
	IMG_SIZE=64 CONFIGS="configs/demo.yaml configs/demo_db_cas.yaml" NAME=demo POSTPROC=auto ENSEMBLE=greedy

.PHONY: help all demo demo-data test bench preprocess train crt predict evaluate submission clean-demo venv

help: ## show this help
	@echo "CXR-LT 2026 pipeline. Usage: make <target> [VAR=value ...]"
	@echo
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'
	@echo
	@echo "Variables (current value):"
	@$(foreach v,DATASET TRAIN_CSV IMAGE_DIR TEST_CSV REMOVAL_CSV TEST_LABELS IMG_SIZE FOLDS CONFIGS NAME ENSEMBLE POSTPROC NPROC,printf "  %-12s %s\n" "$(v)" "$($(v))";)

# ---- environment -----------------------------------------------------------------------------
venv: $(VENV)/.installed ## create .venv and install requirements (automatic for every target)

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	touch $@

# ---- demo and tests --------------------------------------------------------------------------
demo-data: $(DEMO_DIR)/train.csv ## write the synthetic demo dataset to data/demo/

$(DEMO_DIR)/train.csv: | $(VENV)/.installed
	$(PY) -m cxrlt.demo_data --out $(DEMO_DIR)

demo: $(VENV)/.installed $(DEMO_DIR)/train.csv ## run the whole pipeline on the demo dataset (CPU, minutes)
	$(MAKE) --no-print-directory all $(DEMO_VARS)

test: $(VENV)/.installed ## run the test suite
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

bench: $(VENV)/.installed ## run the benchmarks, print a table, write bench/results.md
	$(PY) bench/run_all.py

clean-demo: ## delete the demo dataset, its cache, runs and submission
	rm -rf $(DEMO_DIR) data/cache/demo_* runs/demo_* submissions/demo.*

# ---- stage 1: image cache --------------------------------------------------------------------
preprocess: $(CACHE)/manifest.json ## build the image cache for TRAIN_CSV + TEST_CSV

$(CACHE)/manifest.json: $(TRAIN_CSV) $(TEST_CSV) | $(VENV)/.installed
	$(PY) preprocess.py --train-csv $(TRAIN_CSV) --image-dir $(IMAGE_DIR) --test-csv $(TEST_CSV) \
		$(REMOVAL_ARG) --size $(IMG_SIZE) --folds $(FOLDS) --out $(CACHE)

# ---- stages 2-5, once per config -------------------------------------------------------------
# $(1) = config stem, $(2) = config file
define RUN_RULES
$(RUNS)/$(1)/model.pt: $(2) $(CACHE)/manifest.json | $(VENV)/.installed
	$(TRAIN_CMD) --config $(2) --cache $(CACHE) --out $(RUNS)/$(1) --resume $(TRAIN_ARGS)

$(RUNS)/$(1)/crt/model.pt: $(RUNS)/$(1)/model.pt
	$(PY) retrain_head.py --run $(RUNS)/$(1) --cache $(CACHE) --out $(RUNS)/$(1)/crt

$(RUNS)/$(1)/pred_val.csv: $(RUNS)/$(1)/crt/model.pt
	$(PY) predict.py --checkpoint $$< --cache $(CACHE) --split val --out $$@ $(PREDICT_ARGS)

$(RUNS)/$(1)/pred_test.csv: $(RUNS)/$(1)/crt/model.pt $(if $(filter auto,$(POSTPROC)),$(RUNS)/$(1)/pred_val.csv)
	$(PY) predict.py --checkpoint $$< --cache $(CACHE) --split test --out $$@ $(PREDICT_ARGS) \
		$(if $(filter auto,$(POSTPROC)),--postproc-from $(RUNS)/$(1)/pred_val.csv.postproc.json)

$(RUNS)/$(1)/eval/metrics.json: $(RUNS)/$(1)/pred_val.csv
	$(PY) evaluate.py --pred $$< --labels $(CACHE)/index.csv --out $(RUNS)/$(1)/eval \
		--train-log $(RUNS)/$(1)/metrics.jsonl
endef
$(foreach c,$(CONFIGS),$(eval $(call RUN_RULES,$(basename $(notdir $(c))),$(c))))

train: $(foreach s,$(STEMS),$(RUNS)/$(s)/model.pt) ## train one backbone per config in CONFIGS
crt: $(foreach s,$(STEMS),$(RUNS)/$(s)/crt/model.pt) ## classifier re-training on each trained run
predict: $(foreach s,$(STEMS),$(RUNS)/$(s)/pred_val.csv $(RUNS)/$(s)/pred_test.csv) ## TTA predictions (val fold + test list)
evaluate: $(foreach s,$(STEMS),$(RUNS)/$(s)/eval/metrics.json) ## metrics, report and plots on the val fold

# ---- stage 6: ensemble -> submission ---------------------------------------------------------
$(SUB).csv: $(foreach s,$(STEMS),$(RUNS)/$(s)/pred_test.csv $(RUNS)/$(s)/pred_val.csv $(RUNS)/$(s)/eval/metrics.json)
	$(PY) ensemble.py combine --method $(ENSEMBLE) \
		--test $(foreach s,$(STEMS),$(RUNS)/$(s)/pred_test.csv) \
		--val $(foreach s,$(STEMS),$(RUNS)/$(s)/pred_val.csv) --val-labels $(CACHE)/index.csv \
		--test-list $(TEST_CSV) --out $@ --zip $(SUB).zip

$(SUB).score.json: $(SUB).csv $(TEST_LABELS)
	$(PY) evaluate.py --pred $< --labels $(TEST_LABELS) --out $(SUB)_eval --index $(CACHE)/index.csv
	cp $(SUB)_eval/metrics.json $@.tmp && mv $@.tmp $@

submission: $(SUB).csv ## ensemble the configs' test predictions into submissions/$(NAME).csv (+ .zip)

all: $(SUB).csv $(if $(TEST_LABELS),$(SUB).score.json) ## everything: cache, train, cRT, predict, evaluate, ensemble, submission
	@echo "submission: $(SUB).csv  (zip: $(SUB).zip)"
	$(if $(TEST_LABELS),@$(PY) -c "import json; m=json.load(open('$(SUB).score.json')); print(f\"test mAP {m['mAP']:.4f}  mAUC {m['mAUC']:.4f}  (scored against $(TEST_LABELS))\")")

# ==== Task 2: zero-shot scores for the six unseen findings (issue 15; one block) ============
# `make task2` scores TEST_CSV's images (the cache's test rows) with a CLIP-style model and a
# prompt file (zeroshot.py), then writes submissions/$(NAME)_task2.csv (+ .zip) in test-list
# order with ensemble.py and checks it against the Task-2 label set. `make all TASK2=1` includes
# it. Image embeddings are cached per model in $(ZS_DIR)/embeddings: another prompt file, method
# or ZS_ARGS re-runs only the scoring (seconds). `make demo-task2`: a tiny random model, plumbing only.
ZS_MODEL     ?= hf-hub:yyupenn/whyxrayclip#  hf-hub:ORG/REPO | local-dir:FOLDER | open_clip config name + ZS_WEIGHTS
ZS_WEIGHTS   ?=#                             local weights file for a config-name ZS_MODEL (e.g. ViT-L-14)
ZS_PROMPTS   ?= prompts/task2.yaml#          prompts per finding (positive, optional negative)
ZS_METHOD    ?= cosine#                      cosine (mean cosine over prompts -> sigmoid) | softmax (positive vs negative)
ZS_ARGS      ?=#                             extra zeroshot.py flags (e.g. --pool embedding --temperature 0.05 --device cpu)
TASK2        ?=#                             1: `make all` also writes the Task-2 submission
TASK2_LABELS ?=#                             optional: Task-2 labels for TEST_CSV; then `make task2` scores the submission
TASK2_LABEL_SET := prompts/cxrlt2026_task2_labels.txt
ZS_DIR    := $(RUNS)/zeroshot
ZS_PRED   := $(ZS_DIR)/pred_test.csv
SUB2      := $(SUB)_task2
ZS_FOLDER := $(patsubst local-dir:%,%,$(filter local-dir:%,$(ZS_MODEL)))
# the variables zeroshot.py reads, in a file rewritten only when they change (Make sees files only)
ZS_INPUTS := model=$(ZS_MODEL) weights=$(ZS_WEIGHTS) method=$(ZS_METHOD) args=$(ZS_ARGS)

.PHONY: task2 demo-task2 clean-demo-task2 FORCE
FORCE:

$(ZS_DIR)/inputs.txt: FORCE
	@mkdir -p $(@D); printf '%s\n' '$(subst ','\'',$(ZS_INPUTS))' > $@.new; cmp -s $@.new $@ && rm $@.new || mv $@.new $@

$(ZS_PRED): $(ZS_DIR)/inputs.txt $(ZS_PROMPTS) $(TASK2_LABEL_SET) $(ZS_WEIGHTS) \
		$(if $(ZS_FOLDER),$(ZS_FOLDER)/open_clip_config.json) $(CACHE)/manifest.json | $(VENV)/.installed
	$(PY) zeroshot.py --cache $(CACHE) --split test --model $(ZS_MODEL) $(if $(ZS_WEIGHTS),--weights $(ZS_WEIGHTS)) \
		--prompts $(ZS_PROMPTS) --labels-file $(TASK2_LABEL_SET) --method $(ZS_METHOD) \
		--embeddings $(ZS_DIR)/embeddings --out $@ $(ZS_ARGS)

$(SUB2).csv: $(ZS_PRED) $(TEST_CSV)
	$(PY) ensemble.py combine --method mean --test $< --test-list $(TEST_CSV) --out $@ --zip $(SUB2).zip
	$(PY) ensemble.py check $@ --test-list $(TEST_CSV) --labels-file $(TASK2_LABEL_SET)

$(SUB2).score.json: $(SUB2).csv $(TASK2_LABELS)
	$(PY) evaluate.py --pred $< --labels $(TASK2_LABELS) --out $(SUB2)_eval
	cp $(SUB2)_eval/metrics.json $@.tmp && mv $@.tmp $@

task2: $(SUB2).csv $(if $(TASK2_LABELS),$(SUB2).score.json) ## Task 2: zero-shot scores of the 6 unseen findings -> submissions/$(NAME)_task2.csv (+ .zip)
	@echo "Task-2 submission: $(SUB2).csv  (zip: $(SUB2).zip; model $(ZS_MODEL))"
	$(if $(TASK2_LABELS),@$(PY) -c "import json; m=json.load(open('$(SUB2).score.json')); print(f\"Task-2 test mAP {m['mAP']:.4f}  mAUC {m['mAUC']:.4f}  (scored against $(TASK2_LABELS))\")")

all: $(if $(filter 1,$(TASK2)),task2)

# the demo: a tiny open_clip model with random weights, built locally (no download; scores mean nothing)
DEMO_ZS_MODEL := $(DEMO_DIR)/tiny_clip
DEMO_VARS += ZS_MODEL=local-dir:$(DEMO_ZS_MODEL)

$(DEMO_ZS_MODEL)/open_clip_config.json: | $(VENV)/.installed
	$(PY) -m cxrlt.tiny_clip --out $(DEMO_ZS_MODEL)

demo-task2: $(VENV)/.installed $(DEMO_DIR)/train.csv ## Task 2 on the demo with a tiny random model (checks the plumbing; its scores mean nothing)
	$(MAKE) --no-print-directory task2 $(DEMO_VARS)

clean-demo: clean-demo-task2
clean-demo-task2:
	rm -f submissions/demo_task2.*
	rm -rf submissions/demo_task2_eval
