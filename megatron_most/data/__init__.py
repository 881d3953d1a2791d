"""Audio-text data: manifests, tokenizers, prompt templates, preprocessing and training datasets."""
