#!/usr/bin/env bash
# The main job: does it work? On any Linux box without a GPU or downloads, in about 20 minutes on
# 2 cores: make a speech corpus with espeak-ng (training voices and held-out voices kept apart),
# extract log-mel features and k-means units, pack ASR / TTS / text, train the small MoST with MAMoE
# at expert parallelism 2 (torchrun, 2 CPU ranks), evaluate on voices never trained on, and write
# OUT/report.md with the figures, loss curves and the routing heatmap.
#
#   bash scripts/quickstart.sh                 # the full run (runs/quickstart)
#   bash scripts/quickstart.sh --ci            # a few dozen utterances and steps: every stage runs
#   bash scripts/quickstart.sh --out DIR       # another output folder
#
# A re-run reuses every finished stage (delete OUT/.done/STAGE to redo one). Real runs point
# --audio-encoder at a pretrained mHuBERT (tools/train_units.py, tools/preprocess_audio_text.py);
# the log-mel front end is used here because a random HuBERT carries almost nothing to learn from.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=runs/quickstart
CI=0
while [ $# -gt 0 ]; do
    case "$1" in
        --ci) CI=1; OUT=runs/quickstart_ci ;;
        --out) OUT=$2; shift ;;
        *) echo "quickstart.sh: unknown argument '$1' (use --ci, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$CI" -eq 1 ]; then  # every stage on a tiny budget: CI checks the job runs, not what it learns
    TRAIN=48 TEST=8 TEXT=400 K=128 ITERS=12 WORKERS=1 EXTRA=(--save-interval 12 --eval-interval 6 --log-interval 3
                                                 --mamoe-stats-interval 6 --lr-warmup-iters 2)
else
    TRAIN=4000 TEST=120 TEXT=20000 K=128 ITERS=${QUICKSTART_ITERS:-560} WORKERS=2 EXTRA=()
fi
START=$(date +%s)
CORPUS=$OUT/corpus PACKED=$OUT/packed RUN=$OUT/train EVAL=$OUT/eval
mkdir -p "$OUT/.done"

stage() {  # stage NAME COMMAND...: run once; a finished stage is skipped on a re-run
    local name=$1; shift
    if [ -f "$OUT/.done/$name" ]; then
        echo "[quickstart] $name: done earlier, reused"
        return
    fi
    echo "[quickstart] $name ($(( ($(date +%s) - START) / 60 )) min so far)"
    "$@"
    touch "$OUT/.done/$name"
}

setup() {  # the tests' setup (scripts/setup.sh) when this Python cannot run the package yet
    if python -c "import megatron_most, matplotlib, sentencepiece, jiwer" 2>/dev/null \
        && bash scripts/install_speech_tools.sh >/dev/null; then
        echo "already installed"
    else
        bash scripts/setup.sh
    fi
}

corpus() {
    python tools/make_speech_corpus.py --out "$CORPUS" --train "$TRAIN" --test "$TEST" --text "$TEXT"
}

units() {
    python tools/train_units.py --input "$CORPUS/train.jsonl" --audio-encoder logmel --k "$K" \
        --n-init 1 --max-iter 30 --max-frames 100000 --output "$CORPUS/units.safetensors" --device cpu
}

pack() {
    local common=(--tokenizer "$CORPUS/sp.model" --preset small --audio-encoder logmel --units "$CORPUS/units.safetensors"
                  --workers "$WORKERS" --device cpu --max-tokens 513 --overwrite)  # 513 = seq_length + 1
    python tools/preprocess_audio_text.py --input "$CORPUS/train.jsonl" --task asr --mode features \
        --output-prefix "$PACKED/asr" "${common[@]}"
    python tools/preprocess_audio_text.py --input "$CORPUS/train.jsonl" --task asr --mode units \
        --output-prefix "$PACKED/asr_units" "${common[@]}"
    python tools/preprocess_audio_text.py --input "$CORPUS/train.jsonl" --task tts --mode units \
        --output-prefix "$PACKED/tts" "${common[@]}"
    python tools/preprocess_audio_text.py --input "$CORPUS/text.jsonl" --task lm --output-prefix "$PACKED/text" \
        --tokenizer "$CORPUS/sp.model" --preset small --workers 1 --max-tokens 513 --overwrite
}

train() {  # stage 1's mixture ASR .4 (features .3 + units .1: the units teach the ASR that judges TTS) / TTS .4 / text .2
    rm -rf "$RUN"
    python -m torch.distributed.run --nproc_per_node 2 tools/pretrain_most.py --config examples/quickstart/small.yaml \
        --data-path 0.3 "$PACKED/asr" 0.1 "$PACKED/asr_units" 0.4 "$PACKED/tts" 0.2 "$PACKED/text" \
        --train-iters "$ITERS" --save "$RUN" --tensorboard-dir "$RUN/tensorboard" \
        --wandb-project megatron_most_quickstart --wandb-exp-name "$(basename "$OUT")" "${EXTRA[@]}"
}

evaluate() {
    local common=(--checkpoint "$RUN" --tokenizer "$CORPUS/sp.model" --audio-encoder logmel
                  --units "$CORPUS/units.safetensors" --batch-size 16 --max-new-tokens 96)
    python tools/evaluate.py asr --data "$CORPUS/test_seen.jsonl" --name asr_seen_voices --out "$EVAL/asr_seen" "${common[@]}"
    python tools/evaluate.py asr --data "$CORPUS/test_heldout.jsonl" --name asr_heldout_voices \
        --out "$EVAL/asr_heldout" "${common[@]}"
    python tools/evaluate.py tts --data "$CORPUS/test_heldout.jsonl" --name tts_heldout_texts \
        --out "$EVAL/tts" "${common[@]}"
    python tools/evaluate.py text --data "$CORPUS/text_test.jsonl" --name text_perplexity --out "$EVAL/text" "${common[@]}"
}

stage setup setup
stage corpus corpus
stage units units
stage pack pack
stage train train
stage evaluate evaluate
python tools/quickstart_report.py --out "$OUT" --minutes "$(( ($(date +%s) - START + 30) / 60 ))"
