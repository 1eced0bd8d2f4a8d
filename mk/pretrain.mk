# ---- pretraining on a public chest X-ray dataset (docs/pretraining.md) -------------------------
# make pretrain PRETRAIN_CONFIG=configs/x.yaml PRETRAIN_DATASET=nih|chexpert|mimic PRETRAIN_DATA_DIR=DIR
# builds the dataset's train cache from its native layout (preprocess.py external) and trains the
# config on it. A PadChest config starts from the result with
#   init_checkpoint: $(PRETRAIN_MODEL)     (the head is re-initialised: the labels differ)
# and `make all ... PRETRAIN_FOR="<its stem>"` trains the pretraining run first.
# Both recipes always run and decide themselves: preprocess.py leaves an unchanged cache as it is,
# train.py --resume leaves a finished run with the same training keys as it is (model.pt untouched),
# so a PadChest run retrains only when the pretrained model really changed.
PRETRAIN_CONFIG        ?=#                              the config trained on the external dataset
PRETRAIN_DATASET       ?= nih#                          nih | chexpert | mimic (cxrlt/data/external.py); several: one cache, union of labels
PRETRAIN_DATA_DIR      ?=#                              the dataset's folder as downloaded (one per PRETRAIN_DATASET)
PRETRAIN_UNCERTAIN     ?= zeros#                        an uncertain (-1) label: ones | zeros | ignore (one, or one per dataset)
PRETRAIN_BLANK         ?= zeros#                        a blank label: zeros | ignore (one, or one per dataset)
PRETRAIN_OFFICIAL_TEST ?= keep#                         the dataset's own test split: keep | drop
PRETRAIN_SIZE          ?= $(IMG_SIZE)#                  side of its cached images
PRETRAIN_ARGS          ?=#                              config overrides of the pretraining run only
PRETRAIN_FOR           ?=#                              config stems whose training waits for the pretraining run

$(call check_enum_list,PRETRAIN_DATASET,nih chexpert mimic)
$(call check_enum_list,PRETRAIN_UNCERTAIN,ones zeros ignore)
$(call check_enum_list,PRETRAIN_BLANK,zeros ignore)
$(call check_enum,PRETRAIN_OFFICIAL_TEST,keep drop)

PRETRAIN_STEM  := $(basename $(notdir $(PRETRAIN_CONFIG)))
PRETRAIN_EMPTY :=
PRETRAIN_SPACE := $(PRETRAIN_EMPTY) $(PRETRAIN_EMPTY)
PRETRAIN_JOIN   = $(subst $(PRETRAIN_SPACE),+,$(strip $(1)))
PRETRAIN_KEY   := u$(call PRETRAIN_JOIN,$(PRETRAIN_UNCERTAIN))-b$(call PRETRAIN_JOIN,$(PRETRAIN_BLANK))-$(PRETRAIN_OFFICIAL_TEST)
PRETRAIN_NAME  := $(call PRETRAIN_JOIN,$(PRETRAIN_DATASET))
PRETRAIN_CACHE := $(CACHE_ROOT)/$(PRETRAIN_NAME)_$(PRETRAIN_SIZE)/train-$(PRETRAIN_KEY)
PRETRAIN_RUN   := $(RUNS_ROOT)/pretrain/$(PRETRAIN_NAME)_$(PRETRAIN_SIZE)-$(PRETRAIN_KEY)/$(PRETRAIN_STEM)
PRETRAIN_MODEL := $(PRETRAIN_RUN)/model.pt

.PHONY: pretrain pretrain-check
pretrain: $(PRETRAIN_MODEL) ## train PRETRAIN_CONFIG on a public dataset (PRETRAIN_DATASET, PRETRAIN_DATA_DIR)
	@echo "pretrained: $(PRETRAIN_MODEL)  (a config starts from it with init_checkpoint: $(PRETRAIN_MODEL))"

pretrain-check:
	$(if $(PRETRAIN_CONFIG),,$(error PRETRAIN_CONFIG is not set (the config to pretrain, e.g. configs/demo.yaml)))
	$(if $(PRETRAIN_DATA_DIR),,$(error PRETRAIN_DATA_DIR is not set (the $(PRETRAIN_DATASET) folder as downloaded)))
	@:

$(PRETRAIN_CACHE)/manifest.json: pretrain-check FORCE | $(VENV)/.installed
	$(PY) preprocess.py external $(foreach d,$(PRETRAIN_DATASET),--dataset $(d)) $(foreach d,$(PRETRAIN_DATA_DIR),--data-dir $(d)) \
		$(foreach u,$(PRETRAIN_UNCERTAIN),--uncertain $(u)) $(foreach b,$(PRETRAIN_BLANK),--blank $(b)) \
		--official-test $(PRETRAIN_OFFICIAL_TEST) \
		--size $(PRETRAIN_SIZE) --folds $(FOLDS) --out $(@D) $(PREPROCESS_ARGS)

$(PRETRAIN_MODEL): $(PRETRAIN_CACHE)/manifest.json FORCE | $(VENV)/.installed
	$(TRAIN_CMD) --config $(PRETRAIN_CONFIG) --cache $(PRETRAIN_CACHE) --out $(PRETRAIN_RUN) --resume \
		--img_size $(PRETRAIN_SIZE) $(PRETRAIN_ARGS)

# the PadChest runs that start from the pretrained model wait for it (STEMS: set by the plan; Make
# reads the makefiles again once the plan is remade, so the stems of this command's CONFIGS apply)
$(foreach s,$(filter $(STEMS),$(PRETRAIN_FOR)),$(eval $(R_$(s))/model.pt: $(PRETRAIN_RUN)/model.key))

# model.pt's content key, rewritten only when the weights change: an up-to-date pretraining run
# (train.py touches model.pt) re-runs nothing downstream
$(PRETRAIN_RUN)/model.key: $(PRETRAIN_MODEL)
	@$(PY) -c "import os, sys; from cxrlt.core.hashing import file_key; k = file_key(sys.argv[1]) + '\n'; \
		p = sys.argv[2]; old = open(p).read() if os.path.exists(p) else ''; k != old and open(p, 'w').write(k)" \
		$(PRETRAIN_MODEL) $@

# ---- the pretraining demo: synthetic NIH-shaped data -> the demo recipe -> PadChest demo ------------
DEMO_EXTERNAL_DIR := data/demo_external
.PHONY: demo-pretrain demo-pretrain-data
demo-pretrain-data: $(DEMO_EXTERNAL_DIR)/nih/Data_Entry_2017_v2020.csv ## write the synthetic NIH-, CheXpert- and MIMIC-shaped datasets

$(DEMO_EXTERNAL_DIR)/nih/Data_Entry_2017_v2020.csv: | $(VENV)/.installed
	$(PY) -m cxrlt.synth.external --kind nih --out $(DEMO_EXTERNAL_DIR)/nih --n 1500
	$(PY) -m cxrlt.synth.external --kind chexpert --out $(DEMO_EXTERNAL_DIR)/chexpert --n 300
	$(PY) -m cxrlt.synth.external --kind mimic --out $(DEMO_EXTERNAL_DIR)/mimic --n 300

demo-pretrain: $(VENV)/.installed $(DEMO_DIR)/train.csv $(DEMO_EXTERNAL_DIR)/nih/Data_Entry_2017_v2020.csv ## pretrain on synthetic NIH, then the PadChest demo (CPU, minutes)
	$(MAKE) --no-print-directory all $(DEMO_VARS) NAME=demo_pretrain CONFIGS=configs/demo_pretrained.yaml \
		PRETRAIN_CONFIG=configs/demo.yaml PRETRAIN_DATASET=nih PRETRAIN_DATA_DIR=$(DEMO_EXTERNAL_DIR)/nih \
		PRETRAIN_SIZE=64 PRETRAIN_FOR=demo_pretrained

# ---- pseudo-labels: a trained run's labels on the external cache (pseudo_label.py) ---------------
PSEUDO_CHECKPOINT ?=#                                   model.pt of the run that labels the images
PSEUDO_OUT        ?= $(RUNS_ROOT)/pseudo/$(PRETRAIN_NAME)_$(PRETRAIN_SIZE)-$(PRETRAIN_KEY).csv
.PHONY: pseudo-labels
pseudo-labels: $(PRETRAIN_CACHE)/manifest.json | $(VENV)/.installed ## soft labels of PSEUDO_CHECKPOINT's labels on the external cache
	$(if $(PSEUDO_CHECKPOINT),,$(error PSEUDO_CHECKPOINT is not set (the model.pt that predicts the soft labels)))
	$(PY) pseudo_label.py --checkpoint $(PSEUDO_CHECKPOINT) --cache $(PRETRAIN_CACHE) --out $(PSEUDO_OUT)
