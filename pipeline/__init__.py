"""Offline teacher-logit distillation for Gemma 2: the library behind the stages."""

from pipeline.checkpoint import load_model, model_fingerprint, save_model
from pipeline.errors import PipelineError
from pipeline.model import PRESETS, Gemma2, Gemma2Config, preset
from pipeline.tokenizer import Tokenizer

__all__ = [
    "PRESETS", "Gemma2", "Gemma2Config", "PipelineError", "Tokenizer",
    "load_model", "model_fingerprint", "preset", "save_model",
]
