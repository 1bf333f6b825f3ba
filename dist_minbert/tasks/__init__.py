"""Tasks as data: configs, the builtin CS224N registry, readers, heads, the multitask model, metrics, predictions."""
