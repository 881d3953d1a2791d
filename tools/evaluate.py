"""Score a trained MoST as the paper does: ASR and TTS WER, sWUGGY/sBLIMP, StoryCloze, spoken QA.

    python tools/evaluate.py asr --checkpoint runs/stage1 --tokenizer tok.model --hubert mhubert --layer 11 \\
        --data LibriSpeech/test-clean --name asr_librispeech_clean --out eval/
    python tools/evaluate.py tts --checkpoint runs/stage1 --tokenizer tok.model --data test.jsonl \\
        --vocoder vocoder/ --judge hubert-large-ls960-ft --out eval/        # without --judge: own ASR
    python tools/evaluate.py swuggy --checkpoint runs/stage1 --tokenizer tok.model --hubert mhubert \\
        --layer 11 --units km500.safetensors --data lexical/dev/gold.csv [--reduction mean] --out eval/

Writes OUT/results.json, OUT/results.md (ours beside the paper's numbers) and per-item JSONL.
Exit status 0 (evaluated; failed items are listed in the results), 2 (bad options).
"""

import argparse
import sys

from megatron_most.audio.encoder import add_encoder_argument
from megatron_most.eval.run import TASKS, EvalOptions, evaluate
from megatron_most.inference.hf import is_hf_export
from megatron_most.inference.load import checkpoint_config, inference_layout
from megatron_most.inference.run import GenerateOptions
from megatron_most.options import ConfigError
from megatron_most.platform import initialize, shutdown


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--checkpoint", required=True, help="save folder (latest checkpoint) or torch_dist folder")
    p.add_argument("--tokenizer", required=True, help="the model's text tokenizer")
    p.add_argument("--data", required=True, help="manifest .jsonl, LibriSpeech folder, gold.csv or stories .jsonl")
    p.add_argument("--out", default="eval", help="output folder")
    p.add_argument("--name", help="result name, e.g. asr_librispeech_clean (picks the paper's number)")
    p.add_argument("--audio-dir", help="ZeroSpeech audio folder (default: beside gold.csv)")
    p.add_argument("--reduction", choices=("sum", "mean"), default="sum", help="spoken-LM score")
    p.add_argument("--judge", help="TTS: transformers ASR directory (Whisper or CTC)")
    add_encoder_argument(p)
    p.add_argument("--layer", type=int, help="HuBERT hidden_states index")
    p.add_argument("--units", help="unit codebook")
    p.add_argument("--mode", choices=("features", "units"), default="features", help="how prompt audio enters")
    p.add_argument("--vocoder", help="unit vocoder folder")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--language", default="en", help="WER normaliser: en = Whisper's English one")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        generate = GenerateOptions(
            checkpoint=args.checkpoint, tokenizer=args.tokenizer, hubert=args.hubert, layer=args.layer,
            units=args.units, mode=args.mode, vocoder=args.vocoder, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )  # fmt: skip
        opts = EvalOptions(
            task=args.task, data=args.data, out=args.out, name=args.name, audio_dir=args.audio_dir,
            reduction=args.reduction, judge=args.judge, language=args.language, generate=generate,
        )  # fmt: skip
        if is_hf_export(args.checkpoint):  # transformers serves it in this process: no groups
            evaluate(opts)
            return 0
        _, most = checkpoint_config(args.checkpoint)
    except (ConfigError, FileNotFoundError) as err:
        print(f"evaluate.py: {err}", file=sys.stderr)
        return 2
    layout = inference_layout(args.tensor_model_parallel_size, args.expert_model_parallel_size)
    initialize(layout, num_experts=most.mamoe.num_experts)
    try:
        evaluate(opts)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
