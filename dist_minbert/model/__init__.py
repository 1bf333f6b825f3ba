"""MinBERT: a plain-PyTorch BERT encoder, its Hugging Face checkpoint adapter, WordPiece tokenizer and exporter."""
