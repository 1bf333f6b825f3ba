"""dist_minbert: distributed multitask BERT fine-tuning."""
