"""Floor 4 (beside `convert`): audio-text data: manifests, tokenizers, prompt templates, unit
codebook training, preprocessing into indexed datasets (plan -> worker -> run) and the packed,
blended training datasets. Imports `model` (token layout), `audio`, `platform`, `options`.
"""
