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
  FILTER_MEMORY_MB:tokenize:filter_memory_mb \
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
  ONPOLICY:train_student:onpolicy ONPOLICY_FRACTION:train_student:onpolicy_fraction \
  ALLOW_STALE_ROUNDS:train_student:allow_stale_rounds IS_CLIP:train_student:is_clip INIT_FROM:train_student:init_from \
  CACHE:report:cache TEACHER:report:teacher STUDENT_DIR:report:students \
  MERGE_OUT:merge:out MERGE_WEIGHTS:merge:weights \
  SHARD:inspect:file ROW:inspect:row POS:inspect:pos \
  MODEL:generate:model MAX_NEW_TOKENS:generate:max_new_tokens TOP_P:generate:top_p \
  TEACHER:plan:teacher SEQ_LEN:plan:seq_len CAPTURE_BATCH:plan:capture_batch HEAD_CHUNK:plan:head_chunk \
  TOPK:plan:topk SAMPLES:plan:samples DTYPE:plan:dtype CACHE_PRESET:plan:cache_preset \
  LOGPROB_CODING:plan:logprob_coding LOSS:plan:loss KD_TARGET:plan:kd_target LOSS_CHUNK:plan:loss_chunk \
  BATCH_SIZE:plan:batch_size GRAD_ACCUM:plan:grad_accum BATCH_TOKENS:plan:batch_tokens SHARDING:plan:sharding \
  PRECISION:plan:precision WORLD:plan:world GPU:plan:gpu GPU_MEMORY_GB:plan:gpu_memory_gb MFU:plan:mfu \
  PLAN_TOKENS:plan:plan_tokens \
  PREFERENCES:reward_model:preferences BASE:reward_model:base REWARD_MODEL:reward_model:out \
  MAX_STEPS:reward_model:max_steps FILTERS:reward_model:filters BLOCKLIST:reward_model:blocklist NEAR_THRESHOLD:reward_model:near_threshold \
  MIN_CHARS:reward_model:min_chars MAX_CHARS:reward_model:max_chars \
  MODEL:rlhf:model REWARD_MODEL:rlhf:reward_model PROMPTS:rlhf:prompts RLHF_OUT:rlhf:out MAX_STEPS:rlhf:max_steps \
  KL_COEF:rlhf:kl_coef LR:rlhf:lr SEED:rlhf:seed MAX_NEW_TOKENS:rlhf:max_new_tokens \
  TOKENS:teacher_logits:tokens \
  MODEL:rollouts:model PROMPTS:rollouts:prompts ROLLOUTS:rollouts:rollouts ROLLOUTS_PER_PROMPT:rollouts:rollouts_per_prompt \
  MAX_NEW_TOKENS:rollouts:max_new_tokens TOP_P:rollouts:top_p ENGINE:rollouts:engine SEED:rollouts:seed \
  ROLLOUT_BATCH:rollouts:batch_size FILTERS:rollouts:filters MIN_CHARS:rollouts:min_chars MAX_CHARS:rollouts:max_chars \
  MODEL:onpolicy:model PROMPTS:onpolicy:prompts TEACHER:onpolicy:teacher ROUNDS:onpolicy:rounds \
  ROLLOUTS_PER_PROMPT:onpolicy:rollouts_per_prompt MAX_NEW_TOKENS:onpolicy:max_new_tokens TOP_P:onpolicy:top_p \
  ENGINE:onpolicy:engine ROLLOUT_BATCH:onpolicy:rollout_batch SEED:onpolicy:seed LOSS:onpolicy:loss \
  ONPOLICY_FRACTION:onpolicy:onpolicy_fraction ALLOW_STALE_ROUNDS:onpolicy:allow_stale_rounds \
  MAX_TOKENS:onpolicy:max_tokens ONPOLICY_CACHE:onpolicy:cache

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
  demo-chat generate plan reward-model rlhf demo-rlhf rollouts onpolicy demo-onpolicy

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

reward-model: $(VENV)/.installed ## preference pairs (PREFERENCES=file) -> Gemma 2 reward model from BASE=dir with TRL ($(WORK)/reward-model or REWARD_MODEL=; MAX_STEPS)
	$(LAUNCH) -m stages.reward_model $(common) $(call flags,reward_model) $(EXTRA)

rlhf: $(VENV)/.installed ## RLOO (TRL) of MODEL=dir against REWARD_MODEL=dir on PROMPTS=file, KL_COEF to MODEL ($(WORK)/students/<name>-rlhf or RLHF_OUT=; MAX_STEPS)
	$(LAUNCH) -m stages.rlhf $(common) $(call flags,rlhf) $(EXTRA)

demo-rlhf: $(VENV)/.installed ## after demo-chat: preferences -> reward model -> RLHF of the chat KD student -> merge with it, in $(WORK)/chat
	$(PY) -m stages.demo_rlhf --work $(WORK) $(if $(CONFIG),--config $(CONFIG)) $(sets) $(EXTRA)

rollouts: $(VENV)/.installed ## a model's own sampled replies: MODEL=dir PROMPTS=file.jsonl -> chat token shards with behaviour_logprob ($(WORK)/rollouts or ROLLOUTS=); ranks under LAUNCH
	$(LAUNCH) -m stages.rollouts $(common) $(call flags,rollouts) $(EXTRA)

onpolicy: $(VENV)/.installed ## ROUNDS=R of rollouts -> teacher-logits -> train-student from MODEL=dir on PROMPTS=file, TEACHER scores ($(WORK)/onpolicy/round-r); resumable
	$(PY) -m stages.onpolicy $(common) --launch "$(LAUNCH)" $(call flags,onpolicy) $(EXTRA)

demo-onpolicy: $(VENV)/.installed ## after demo-chat: the chat KD student continued on-policy vs off-policy, same teacher-token budget ($(WORK)/chat/onpolicy-demo)
	$(PY) -m stages.demo_onpolicy --work $(WORK) $(if $(CONFIG),--config $(CONFIG)) $(EXTRA)

bench: $(VENV)/.installed ## benchmarks (CPU part; benchmarks/gpu.sh on a GPU)
	$(PY) -m benchmarks.run --work $(WORK) $(EXTRA)
