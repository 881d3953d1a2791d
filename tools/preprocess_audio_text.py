"""Pack speech/text JSONL manifests into a MoST audio-text dataset (Megatron IndexedDataset files).

    python tools/preprocess_audio_text.py --input train.jsonl --task asr --output-prefix data/asr \\
        --tokenizer tok.model --hubert mhubert-base --units codebook.safetensors --mode units --workers 8

Writes P.bin/.idx (int32 tokens), P_loss_mask.*, P_features.* (--mode features), P.json (header) and
P.rejects.jsonl (one line per dropped sample with the reason). An interrupted run resumes: run the
same command again and only the unfinished shards are packed. Format: megatron_most/data/indexed.py.

--max-tokens should be the model's seq_length + 1 (the training dataset reads seq_length + 1 tokens
per item), so no packed sample is too long to train on: longer lm documents are split into chunks,
longer samples of the other tasks are rejected. --template-config takes a JSON object of
TemplateOptions fields (megatron_most/data/templates.py), e.g.
{"asr_instruction": "Transcribe the audio.", "prompt": "<bos>{instruction}\\n{input}<eos>\\n"}.
Text-only instruct data packs without --hubert (samples with audio are then rejected).
"""

import argparse
import json
import sys
from concurrent.futures.process import BrokenProcessPool

from megatron_most.audio.encoder import add_encoder_argument
from megatron_most.data.indexed import DatasetFormatError
from megatron_most.data.preprocess import preprocess
from megatron_most.data.preprocess_plan import PreprocessOptions
from megatron_most.data.templates import TemplateOptions
from megatron_most.model.config import preset
from megatron_most.options import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, metavar="MANIFEST", help="JSONL manifests, packed in order")
    p.add_argument("--task", required=True, choices=("asr", "tts", "lm", "instruct"), help="prompt template")
    p.add_argument("--output-prefix", required=True, help="output prefix P")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model or Hugging Face tokenizer directory")
    p.add_argument(
        "--mode",
        default="units",
        choices=("units", "features"),
        help="units: audio as unit tokens; features: prompt audio as stored HuBERT features",
    )
    add_encoder_argument(p)
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="HuBERT layer (default: the codebook's, else 11 for units / last for features)",
    )
    p.add_argument("--units", default=None, metavar="CODEBOOK", help="unit codebook from tools/train_units.py")
    p.add_argument(
        "--text-vocab-size",
        type=int,
        default=None,
        help="text rows of the model's table (default: --preset's, else the tokenizer's size)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="MoSTConfig preset the data is for (e.g. deepseek_v2_lite_most): gives --text-vocab-size",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--shard-size", type=int, default=1000, help="manifest lines per shard (unit of restart)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="reject longer audio")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="longest sample (use the model's seq_length + 1): longer lm documents are split into "
        "chunks, longer samples of other tasks rejected (default: no limit)",
    )
    p.add_argument(
        "--template-config",
        default=None,
        metavar="FILE.json",
        help="JSON object of TemplateOptions fields (instructions, prompt/response/lm templates)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="samples per audio batch")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"), help="resampling + HuBERT device")
    p.add_argument("--keep-shards", action="store_true", help="keep P.shards/ after the merge")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output / discard old shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        text_vocab_size = args.text_vocab_size
        if args.preset is not None and text_vocab_size is None:
            text_vocab_size = preset(args.preset).text_vocab_size  # e.g. 102400 rows for DeepSeek's ~100k ids
        opts = PreprocessOptions(
            inputs=tuple(args.input),
            task=args.task,
            output_prefix=args.output_prefix,
            tokenizer=args.tokenizer,
            mode=args.mode,
            hubert=args.hubert,
            layer=args.layer,
            units=args.units,
            text_vocab_size=text_vocab_size,
            workers=args.workers,
            shard_size=args.shard_size,
            max_seconds=args.max_seconds,
            max_tokens=args.max_tokens,
            templates=load_templates(args.template_config),
            batch_size=args.batch_size,
            device=args.device,
            keep_shards=args.keep_shards,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        preprocess(opts)
    except (ConfigError, DatasetFormatError) as err:
        print(f"preprocess_audio_text.py: error: {err}", file=sys.stderr)
        return 2
    except BrokenProcessPool:
        # Settings are checked before the workers start, so a dead worker is almost always the OS killing it.
        print(
            "preprocess_audio_text.py: error: a worker process died (BrokenProcessPool). Likely cause: out of "
            "memory (lower --workers, --batch-size, or use --device cpu with fewer workers); run with --workers 1 "
            "to see the worker's own error. Finished shards are kept: the same command resumes.",
            file=sys.stderr,
        )
        return 3
    return 0


def load_templates(path):
    """TemplateOptions from a JSON file of its fields (defaults without a file)."""
    if path is None:
        return TemplateOptions()
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--template-config={path!r}: cannot read a JSON object ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"--template-config={path!r}: must hold a JSON object of TemplateOptions fields, "
            f"got {type(values).__name__}"
        )
    try:
        return TemplateOptions.from_dict(values)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"--template-config={path!r}: {err}") from None


if __name__ == "__main__":
    sys.exit(main())
