# Studies: included by the Makefile. ===============================================================
# make study STUDY=studies/<name>.yaml: cxrlt/pipeline/plan.py expands the study file into one generated
# config per variant (x seed x fold) under $(STATE)/studies/<name>/ and adds them to STEMS, so
# every variant goes through the stage rules above (shared caches; a finished run is not redone;
# variants differing only in post-training keys share one backbone via BASE_). The report then
# compares the variants' val predictions: reports/<name>/table.md, table.csv and plots.
STUDY       ?=#                                      a study file (studies/*.yaml) for `make study`
REPORTS_DIR ?= reports#                              study reports: $(REPORTS_DIR)/<study name>/
VARIABLES   += STUDY REPORTS_DIR
STUDY_PLAN  := $(if $(filter study,$(MAKECMDGOALS)),$(STUDY))
STUDY_NAME ?=
STUDY_STEMS ?=
STUDY_MANIFEST ?=
.PHONY: study demo-study demo-winner-ablation

ifneq ($(filter study,$(MAKECMDGOALS)),)
ifeq ($(STUDY),)
$(error make study needs STUDY=studies/<name>.yaml (e.g. make study STUDY=studies/losses.yaml))
endif
endif

ifneq ($(STUDY_NAME),)
$(REPORTS_DIR)/$(STUDY_NAME)/table.md: $(STUDY_MANIFEST) $(foreach s,$(STUDY_STEMS),$(R_$(s))/eval/metrics.json) \
		| $(VENV)/.installed
	$(PY) study.py report --manifest $(STUDY_MANIFEST) --out $(@D) \
		$(foreach s,$(STUDY_STEMS),--run $(s) $(R_$(s)) $(C_$(s))/train)
endif

study: $(if $(STUDY_NAME),$(REPORTS_DIR)/$(STUDY_NAME)/table.md) ## train, evaluate and compare the variants of STUDY=studies/<name>.yaml -> reports/<name>/
	@echo "study report: $(REPORTS_DIR)/$(STUDY_NAME)/table.md (table.csv, per_label.csv, map.png, groups.png, per_label_ap.png)"

demo-study: $(VENV)/.installed $(DEMO_DIR)/train.csv ## a small loss study on the demo dataset (CPU, minutes) -> reports/demo_losses/
	$(MAKE) --no-print-directory study $(DEMO_VARS) STUDY=studies/demo_losses.yaml POSTPROC=off

demo-winner-ablation: $(VENV)/.installed $(DEMO_DIR)/train.csv ## the winner's recipe, one lever off per variant, on the demo -> reports/demo_winner_ablation/
	$(MAKE) --no-print-directory study $(DEMO_VARS) STUDY=studies/demo_winner_ablation.yaml POSTPROC=off
