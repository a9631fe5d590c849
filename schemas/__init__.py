"""Versioned contracts of every artifact on disk, one module each: token shards (`tokens`), logit shards
(`logits`, the cache), split manifests (`manifest`) and a trained model's settings (`run_config`). Writers
and readers both import them; nothing infers a schema from data."""
