# Offline teacher-logit distillation for Gemma 2. `make help` lists targets and variables with their defaults.
#   make teacher-logits TEACHER=/models/gemma-2-27b TOPK=128
# A variable becomes its stage's flag only when set: every default lives once, in the stage (the library's
# settings dataclasses), and `make help` prints it from there.

RUN        ?= demo
WORK       ?= runs/$(RUN)
VENV       ?= .venv
PY         := $(VENV)/bin/python
# Prefix of the GPU stages, e.g. "accelerate launch --num_processes 8" or "torchrun --nproc_per_node 8".
LAUNCH     ?= $(PY)
# The venv first on PATH, so LAUNCH's `accelerate` / `torchrun` are the venv's own.
export PATH := $(abspath $(VENV))/bin:$(PATH)
TORCH_SPEC ?= torch==2.13.0
STUDENTS   ?=
MERGE_INPUTS ?=
CONFIG     ?=
EXTRA      ?=

# VARIABLE:stage:flag — which stage flag each Make variable sets (several stages may share a variable).
SETTINGS := \
  CORPUS:tokenize:corpus TEXT_COLUMN:tokenize:text_column TOKENIZER:tokenize:tokenizer VOCAB:tokenize:vocab \
  SEQ_LEN:tokenize:seq_len VAL_FRACTION:tokenize:val_fraction SHARD_WINDOWS:tokenize:shard_windows \
  CORPUS_TOKENS:tokenize:corpus_tokens VAL_TOKENS:tokenize:val_tokens WORKERS:tokenize:workers \
  FORMAT:tokenize:format MESSAGES_COLUMN:tokenize:messages_column FILTERS:tokenize:filters \
  NEAR_THRESHOLD:tokenize:near_threshold MIN_CHARS:tokenize:min_chars MAX_CHARS:tokenize:max_chars \
  BLOCKLIST:tokenize:blocklist TEXT_DOCS:tokenize:text_docs SKIP_BAD_LINES:tokenize:skip_bad_lines \
  GEN_TEMPERATURE:generate:temperature SEED:generate:seed \
  TEACHER_PRESET:teacher:preset TEACHER_TOKENS:teacher:max_tokens TEACHER:teacher:teacher \
  BATCH_SIZE:teacher:batch_size PRECISION:teacher:precision SEED:teacher:seed \
  TEACHER:teacher_logits:teacher CACHE:teacher_logits:cache TOPK:teacher_logits:topk SAMPLES:teacher_logits:samples \
  CACHE_TOKENS:teacher_logits:cache_tokens CAPTURE_BATCH:teacher_logits:batch_size HEAD_CHUNK:teacher_logits:head_chunk \
  DTYPE:teacher_logits:dtype TEMPERATURE:teacher_logits:temperature \
  CACHE_PRESET:teacher_logits:cache_preset SAMPLING:teacher_logits:sampling ID_CODING:teacher_logits:id_coding \
  LOGPROB_CODING:teacher_logits:logprob_coding \
  CACHE:verify:cache TEACHER:verify:teacher VERIFY_WINDOWS:verify:windows VERIFY_TOLERANCE:verify:tolerance \
  VERIFY_SAMPLE:verify:sample VERIFY_FULL:verify:full \
  CACHE:train_student:cache STUDENT_DIR:train_student:students LOSS:train_student:loss \
  KD_TARGET:train_student:kd_target MAX_TOKENS:train_student:max_tokens BATCH_SIZE:train_student:batch_size \
  LR:train_student:lr SEED:train_student:seed PRECISION:train_student:precision LOSS_CHUNK:train_student:loss_chunk \
  SHARDING:train_student:sharding GRAD_ACCUM:train_student:grad_accum BATCH_TOKENS:train_student:batch_tokens \
  WARMUP_FRACTION:train_student:warmup_fraction SHUFFLE_TOKENS:train_student:shuffle_tokens \
  EVAL_WINDOWS:train_student:eval_windows SAVE_EVERY_TOKENS:train_student:save_every_tokens \
  SELECT:train_student:select \
  SAVE_EVERY_MINUTES:train_student:save_every_minutes MAX_BAD_STEPS:train_student:max_bad_steps \
  TIMEOUT_MINUTES:train_student:timeout_minutes \
  CACHE:report:cache TEACHER:report:teacher STUDENT_DIR:report:students \
  MERGE_OUT:merge:out \
  SHARD:inspect:file ROW:inspect:row POS:inspect:pos \
  MODEL:generate:model MAX_NEW_TOKENS:generate:max_new_tokens TOP_P:generate:top_p \
  TEACHER:plan:teacher SEQ_LEN:plan:seq_len CAPTURE_BATCH:plan:capture_batch HEAD_CHUNK:plan:head_chunk \
  TOPK:plan:topk SAMPLES:plan:samples DTYPE:plan:dtype CACHE_PRESET:plan:cache_preset \
  LOGPROB_CODING:plan:logprob_coding LOSS:plan:loss KD_TARGET:plan:kd_target LOSS_CHUNK:plan:loss_chunk \
  BATCH_SIZE:plan:batch_size GRAD_ACCUM:plan:grad_accum BATCH_TOKENS:plan:batch_tokens SHARDING:plan:sharding \
  PRECISION:plan:precision WORLD:plan:world GPU:plan:gpu GPU_MEMORY_GB:plan:gpu_memory_gb MFU:plan:mfu \
  PLAN_TOKENS:plan:plan_tokens

# --flag value for each set variable mapped to stage $(1); the demo gets --set stage.flag=value instead.
_var  = $(word 1,$(subst :, ,$(1)))
_stg  = $(word 2,$(subst :, ,$(1)))
_key  = $(word 3,$(subst :, ,$(1)))
flags = $(foreach s,$(SETTINGS),$(if $(and $(filter $(1),$(call _stg,$(s))),$(strip $($(call _var,$(s))))),\
          $(if $(filter file,$(call _key,$(s))),,--$(subst _,-,$(call _key,$(s)))) $($(call _var,$(s)))))
sets  = $(foreach s,$(SETTINGS),$(if $(strip $($(call _var,$(s)))),--set $(call _stg,$(s)).$(call _key,$(s))=$($(call _var,$(s)))))
common = --work $(WORK) $(if $(CONFIG),--config $(CONFIG))

.DEFAULT_GOAL := help
.PHONY: help install test lint tokens teacher teacher-logits verify train-student report merge inspect demo bench \
  demo-chat generate plan

help: $(VENV)/.installed ## list targets and variables (with their defaults)
	@echo "targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-16s %s\n", $$1, $$2}'
	@$(PY) -m stages.help $(SETTINGS)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed ## create .venv and install the project with its test extra

test: $(VENV)/.installed ## run the test suite (what CI runs, after lint)
	$(PY) -m pytest -q

lint: $(VENV)/.installed ## ruff over the code (what CI runs before the tests)
	$(PY) -m ruff check pipeline stages schemas benchmarks tests

tokens: $(VENV)/.installed ## corpus -> tokenizer -> token shards ($(WORK)/tokens) in WORKERS processes
	$(LAUNCH) -m stages.tokenize $(common) $(call flags,tokenize) $(EXTRA)

teacher: $(VENV)/.installed ## embedded default only: train the demo teacher on the token shards
	$(LAUNCH) -m stages.teacher $(common) $(call flags,teacher) $(EXTRA)

teacher-logits: $(VENV)/.installed ## teacher over the token shards -> top-K logit shards + manifest ($(WORK)/logits)
	$(LAUNCH) -m stages.teacher_logits $(common) $(call flags,teacher_logits) $(EXTRA)

verify: $(VENV)/.installed ## check a logit cache: every footer; sha256 + invariants on VERIFY_SAMPLE shards (VERIFY_FULL=1: all); VERIFY_WINDOWS=n re-runs the teacher; ranks under LAUNCH
	$(LAUNCH) -m stages.verify $(common) $(call flags,verify) $(EXTRA)

train-student: $(VENV)/.installed ## train every student in STUDENTS from the logit cache
	$(LAUNCH) -m stages.train_student $(common) $(if $(STUDENTS),--student $(STUDENTS)) $(call flags,train_student) $(EXTRA)

report: $(VENV)/.installed ## tables and plots comparing students, teacher and caches ($(WORK)/report)
	$(PY) -m stages.report $(common) $(call flags,report) $(EXTRA)

merge: $(VENV)/.installed ## average students of one shape (MERGE_INPUTS="dirA dirB", MERGE_OUT=dir)
	$(PY) -m stages.merge $(common) $(if $(MERGE_INPUTS),--inputs $(MERGE_INPUTS)) $(call flags,merge) $(EXTRA)

inspect: $(VENV)/.installed ## show a shard's schema, metadata and decoded distributions (SHARD=, ROW=, POS=)
	$(PY) -m stages.inspect $(common) $(call flags,inspect) $(EXTRA)

demo: $(VENV)/.installed ## the whole chain on the embedded default: distilled vs from-scratch students
	$(PY) -m stages.demo --work $(WORK) $(if $(CONFIG),--config $(CONFIG)) $(sets) $(EXTRA)

demo-chat: $(VENV)/.installed ## post-training on the embedded default in $(WORK)/chat: chat teacher, KD vs CE students
	$(PY) -m stages.demo_chat --work $(WORK) $(if $(CONFIG),--config $(CONFIG)) $(sets) $(EXTRA)

# PROMPT is read from the environment (make exports command-line variables), so quotes and backticks are kept.
generate: $(VENV)/.installed ## sample a reply: MODEL=dir PROMPT="..." (chat template when chat-trained)
	$(PY) -m stages.generate $(common) $(call flags,generate) $(if $(PROMPT),--prompt "$$PROMPT") $(EXTRA)

plan: $(VENV)/.installed ## trace TEACHER's capture and STUDENTS' steps at full shape on fake GPUs: memory, time, fits (WORLD, GPU)
	$(PY) -m stages.plan $(common) $(if $(STUDENTS),--student $(STUDENTS)) $(call flags,plan) $(EXTRA)

bench: $(VENV)/.installed ## benchmarks (CPU part; benchmarks/gpu.sh on a GPU)
	$(PY) -m benchmarks.run --work $(WORK) $(EXTRA)
