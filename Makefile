# Offline teacher-logit distillation for Gemma 2. `make help` lists targets and variables.
# Every variable is `?=`: override on the command line, e.g.
#   make teacher-logits TEACHER=/models/gemma-2-27b TOKENIZER=/models/gemma-2-27b/tokenizer.model TOPK=128

RUN        ?= demo
WORK       ?= runs/$(RUN)
CORPUS     ?= stdlib
TOKENIZER  ?=
VOCAB      ?= 4096
SEQ_LEN    ?= 128
VAL_FRACTION ?= 0.03
SHARD_WINDOWS ?= 1024
TEACHER    ?= $(WORK)/teacher
TEACHER_PRESET ?= demo-teacher
TEACHER_TOKENS ?= 1000000
TOPK       ?= 64
SAMPLES    ?= 0
CACHE_TOKENS ?= 0
CACHE      ?= $(WORK)/logits
STUDENTS   ?= demo-student-s demo-student-m
LOSS       ?= kd
KD_TARGET  ?= auto
MAX_TOKENS ?= 400000
BATCH_SIZE ?= 16
LR         ?= 3e-3
SEED       ?= 0
PRECISION  ?= auto
STUDENT_DIR ?= $(WORK)/students
MERGE_INPUTS ?=
MERGE_OUT  ?= $(STUDENT_DIR)/merged
SHARD      ?= $(CACHE)/val/val-00000.parquet
ROW        ?= 0
POS        ?=
EXTRA      ?=

VENV       ?= .venv
PY         := $(VENV)/bin/python
LAUNCH     ?= $(PY)
TORCH_SPEC ?= torch==2.13.0

.DEFAULT_GOAL := help
.PHONY: help install test tokens teacher teacher-logits train-student report merge inspect demo bench

help: ## list targets and variables
	@echo "targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-16s %s\n", $$1, $$2}'
	@echo "variables (current values):"
	@for v in RUN WORK CORPUS TOKENIZER VOCAB SEQ_LEN TEACHER TOPK SAMPLES CACHE_TOKENS STUDENTS LOSS KD_TARGET MAX_TOKENS BATCH_SIZE PRECISION LAUNCH; do \
	  printf "  %-14s %s\n" $$v "$$($(MAKE) -s --no-print-directory print-$$v)"; done

print-%:
	@echo '$($*)'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed ## create .venv and install the project with its test extra

test: $(VENV)/.installed ## run the test suite (what CI runs)
	$(PY) -m pytest -q

tokens: $(VENV)/.installed ## corpus -> tokenizer -> token shards ($(WORK)/tokens)
	$(PY) -m stages.tokenize --work $(WORK) --corpus $(CORPUS) $(if $(TOKENIZER),--tokenizer $(TOKENIZER)) --vocab $(VOCAB) \
	  --seq-len $(SEQ_LEN) --val-fraction $(VAL_FRACTION) --shard-windows $(SHARD_WINDOWS) $(EXTRA)

teacher: $(VENV)/.installed ## embedded default only: train the demo teacher on the token shards
	$(LAUNCH) -m stages.teacher --data $(WORK)/tokens --out $(TEACHER) --preset $(TEACHER_PRESET) \
	  --max-tokens $(TEACHER_TOKENS) --batch-size $(BATCH_SIZE) --precision $(PRECISION) --seed $(SEED) $(EXTRA)

teacher-logits: $(VENV)/.installed ## teacher over the token shards -> top-K logit shards + manifest ($(CACHE))
	$(LAUNCH) -m stages.teacher_logits --teacher $(TEACHER) --tokens $(WORK)/tokens --out $(CACHE) \
	  --topk $(TOPK) --samples $(SAMPLES) --max-train-tokens $(CACHE_TOKENS) $(EXTRA)

train-student: $(VENV)/.installed ## train every student in STUDENTS from the logit cache
	$(LAUNCH) -m stages.train_student --data $(CACHE) --out $(STUDENT_DIR) $(foreach s,$(STUDENTS),--student $(s)) \
	  --loss $(LOSS) --kd-target $(KD_TARGET) --max-tokens $(MAX_TOKENS) --batch-size $(BATCH_SIZE) --lr $(LR) \
	  --seed $(SEED) --precision $(PRECISION) $(EXTRA)

report: $(VENV)/.installed ## tables and plots comparing students, teacher and caches ($(WORK)/report)
	$(PY) -m stages.report --work $(WORK) $(EXTRA)

merge: $(VENV)/.installed ## average students of one shape (MERGE_INPUTS="dirA dirB", MERGE_OUT=dir)
	$(PY) -m stages.merge --inputs $(MERGE_INPUTS) --out $(MERGE_OUT) $(EXTRA)

inspect: $(VENV)/.installed ## show a shard's schema, metadata and decoded distributions (SHARD=, ROW=, POS=)
	$(PY) -m stages.inspect $(SHARD) --row $(ROW) $(if $(POS),--pos $(POS)) $(EXTRA)

demo: $(VENV)/.installed ## the whole chain on the embedded default: distilled vs from-scratch students
	$(PY) -m stages.demo --work $(WORK) $(EXTRA)

bench: $(VENV)/.installed ## benchmarks (CPU part; benchmarks/gpu.sh on a GPU)
	$(PY) -m benchmarks.run --work $(WORK) $(EXTRA)
