"""Versioned pyarrow schemas and validators of every artifact on disk. Writers and readers both import
these; nothing infers a schema from data."""

from schemas.common import META_KEY, read_file_meta
from schemas.logits import LOGITS_VERSION, logits_schema
from schemas.manifest import read_manifest, write_manifest
from schemas.tokens import TOKENS_VERSION, token_schema

__all__ = [
    "LOGITS_VERSION", "META_KEY", "TOKENS_VERSION", "logits_schema", "read_file_meta", "read_manifest",
    "token_schema", "write_manifest",
]
