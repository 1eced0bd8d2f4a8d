# Task 2: zero-shot scores for the six unseen findings; included by the Makefile. ============
# `make task2` scores TEST_CSV's images (the test cache of the first config's image size, the one
# Task 1 uses) with a CLIP-style model and a prompt file (zeroshot.py), then writes
# $(SUB_DIR)/$(NAME)_task2.csv (+ .zip) in test-list order with ensemble.py and checks it against
# the Task-2 label set. `make all TASK2=1` includes it. Image embeddings are cached per model and
# cache in $(ZS_DIR)/embeddings: another prompt file, method or ZS_ARGS re-runs only the scoring
# (seconds). `make demo-task2`: the demo with a tiny random model, plumbing only.
ZS_MODEL     ?= hf-hub:yyupenn/whyxrayclip#  hf-hub:ORG/REPO | local-dir:FOLDER | open_clip config name + ZS_WEIGHTS
ZS_WEIGHTS   ?=#                             local weights file for a config-name ZS_MODEL (e.g. ViT-L-14)
ZS_PROMPTS   ?= prompts/task2.yaml#          prompts per finding (positive, optional negative)
ZS_METHOD    ?= cosine#                      cosine (mean cosine over prompts -> sigmoid) | softmax (positive vs negative)
ZS_ARGS      ?=#                             extra zeroshot.py flags (e.g. --pool embedding --temperature 0.05 --device cpu)
TASK2        ?=#                             1 | (empty): `make all` also writes the Task-2 submission
TASK2_LABELS ?=#                             optional: Task-2 labels for TEST_CSV; then `make task2` scores the submission
VARIABLES += ZS_MODEL ZS_WEIGHTS ZS_PROMPTS ZS_METHOD ZS_ARGS TASK2 TASK2_LABELS
$(call check_enum,ZS_METHOD,cosine softmax)
$(foreach v,ZS_MODEL ZS_WEIGHTS ZS_PROMPTS TASK2_LABELS,$(call check_one_word,$(v)))
$(call check_enum,TASK2,1)
TASK2_LABEL_SET := prompts/cxrlt2026_task2_labels.txt
ZS_DIR    := $(RUNS_ROOT)/$(DATASET)_zeroshot
ZS_PRED   := $(ZS_DIR)/pred_test.csv
ZS_CACHE  := $(if $(FIRST),$(C_$(FIRST)),$(CACHE_ROOT)/$(DATASET)_$(IMG_SIZE))/test-$(TEST_KEY)
SUB2      := $(SUB)_task2
ZS_FOLDER := $(patsubst local-dir:%,%,$(filter local-dir:%,$(ZS_MODEL)))
# what zeroshot.py reads: the plan writes it, with the content hashes of the prompt and label
# files, into a stamp (rewritten only when it changes; TEST_CSV's content is in the cache's key)
ZS_INPUTS = model=$(ZS_MODEL) weights=$(ZS_WEIGHTS) method=$(ZS_METHOD) args=$(ZS_ARGS) cache=$(ZS_CACHE)
ZS_STAMP  := $(STATE)/stamps/$(DATASET)_zeroshot.stamp

.PHONY: task2 demo-task2

$(ZS_PRED): $(ZS_STAMP) $(ZS_WEIGHTS) \
		$(if $(ZS_FOLDER),$(ZS_FOLDER)/open_clip_config.json) $(ZS_CACHE)/manifest.json | $(VENV)/.installed
	$(PY) zeroshot.py --cache $(ZS_CACHE) --split test --model $(ZS_MODEL) $(if $(ZS_WEIGHTS),--weights $(ZS_WEIGHTS)) \
		--prompts $(ZS_PROMPTS) --labels-file $(TASK2_LABEL_SET) --method $(ZS_METHOD) \
		--embeddings $(ZS_DIR)/embeddings --out $@ $(ZS_ARGS)

$(SUB2).csv: $(ZS_PRED)
	$(PY) ensemble.py combine --method mean --test $< --test-list $(TEST_CSV) --labels-file $(TASK2_LABEL_SET) \
		--out $@ --zip $(SUB2).zip $(MAKE_VARS)

$(SUB2).score.json: $(SUB2).csv $(STATE)/stamps/$(NAME)_task2_score.stamp
	$(PY) evaluate.py --pred $< --labels $(TASK2_LABELS) --out $(SUB2)_eval
	cp $(SUB2)_eval/metrics.json $@.tmp && mv $@.tmp $@

task2: $(SUB2).csv $(if $(TASK2_LABELS),$(SUB2).score.json) ## Task 2: zero-shot scores of the 6 unseen findings -> $(SUB_DIR)/$(NAME)_task2.csv (+ .zip)
	@echo "Task-2 submission: $(SUB2).csv  (zip: $(SUB2).zip; model $(ZS_MODEL))"
	$(if $(TASK2_LABELS),@$(PY) -c "import json; m=json.load(open('$(SUB2).score.json')); print(f\"Task-2 test mAP {m['mAP']:.4f}  mAUC {m['mAUC']:.4f}  (scored against $(TASK2_LABELS))\")")

all: $(if $(filter 1,$(TASK2)),task2)

# the demo: a tiny open_clip model with random weights, built locally (no download; scores mean nothing)
DEMO_ZS_MODEL := $(DEMO_DIR)/tiny_clip
DEMO_VARS += ZS_MODEL=local-dir:$(DEMO_ZS_MODEL)

$(DEMO_ZS_MODEL)/open_clip_config.json: | $(VENV)/.installed
	$(VENV)/bin/python -m cxrlt.zeroshot.tiny_clip --out $(DEMO_ZS_MODEL)

demo-task2: $(VENV)/.installed $(DEMO_DIR)/train.csv ## Task 2 on the demo with a tiny random model (checks the plumbing; its scores mean nothing)
	$(MAKE) --no-print-directory task2 $(DEMO_VARS)
