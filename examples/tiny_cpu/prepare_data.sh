#!/usr/bin/env bash
# Packs a small espeak-ng speech corpus for the tiny preset (text vocabulary 256, 32 units,
# 16-d features): ASR with continuous features, TTS with units, and text, each with
# tools/preprocess_audio_text.py. The corpus, tokenizer and a small random HuBERT come from the
# test fixtures (tests/speech.py); real runs point --hubert at a pretrained mHuBERT and
# --tokenizer at the model's tokenizer.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=data/tiny_cpu
python -m tests.speech corpus "$OUT/raw" --utterances 120 --hubert-dim 16
python tools/train_units.py --input "$OUT/raw/speech.jsonl" --hubert "$OUT/raw/hubert" --layer 2 --k 32 \
    --output "$OUT/raw/units.safetensors" --device cpu
common=(--tokenizer "$OUT/raw/sp.model" --preset tiny --hubert "$OUT/raw/hubert" --layer 2 --workers 1 --device cpu
        --max-tokens 513)  # = seq_length + 1 of examples/tiny_cpu/stage1.yaml: longer samples are rejected
python tools/preprocess_audio_text.py --input "$OUT/raw/speech.jsonl" --task asr --mode features \
    --output-prefix "$OUT/packed/asr" "${common[@]}"
python tools/preprocess_audio_text.py --input "$OUT/raw/speech.jsonl" --task tts --mode units \
    --units "$OUT/raw/units.safetensors" --output-prefix "$OUT/packed/tts" "${common[@]}"
python tools/preprocess_audio_text.py --input "$OUT/raw/text.jsonl" --task lm --max-tokens 513 \
    --output-prefix "$OUT/packed/text" --tokenizer "$OUT/raw/sp.model" --preset tiny --workers 1
