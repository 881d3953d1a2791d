"""Generate with a trained MoST: transcribe, speak, continue speech, chat.

    python tools/generate.py asr --checkpoint runs/stage1 --tokenizer tok.model --hubert mhubert \\
        --layer 11 --input a.wav b.flac --out asr.jsonl
    python tools/generate.py tts --checkpoint runs/stage1 --tokenizer tok.model --input texts.txt \\
        --vocoder vocoder/ --out tts.jsonl                         # + tts/<id>.wav
    torchrun --nproc_per_node 4 tools/generate.py chat ... --expert-model-parallel-size 4

--input: audio files, a .txt (one text, or one audio path for asr/continue, per line) or a .jsonl
({"id", "text"} or {"id", "audio"} per line). The checkpoint reshards to the layout asked for here
(any trained TP/PP/EP); a MoST Hugging Face export (megatron-to-hf --format most) runs through
transformers' generate() in one process. Exit status 0 (every request served or recorded as failed), 2 (bad options).
"""

import argparse
import sys

from megatron_most.audio.encoder import add_encoder_argument
from megatron_most.inference.generate import Sampling
from megatron_most.inference.hf import is_hf_export
from megatron_most.inference.load import checkpoint_config, inference_layout
from megatron_most.inference.run import GenerateOptions, read_requests, run
from megatron_most.inference.tasks import TASKS
from megatron_most.options import ConfigError
from megatron_most.platform import initialize, shutdown


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--checkpoint", required=True, help="save folder (latest checkpoint) or torch_dist folder")
    p.add_argument("--tokenizer", required=True, help="the model's text tokenizer (.model or HF dir)")
    p.add_argument("--input", nargs="+", required=True, help="audio files, a .txt or a .jsonl")
    p.add_argument("--out", default="generations.jsonl", help="output JSONL (wavs in a folder named after it)")
    add_encoder_argument(p)
    p.add_argument("--layer", type=int, help="HuBERT hidden_states index")
    p.add_argument("--units", help="unit codebook (units mode, speech continuation)")
    p.add_argument("--mode", choices=("features", "units"), default="features", help="how prompt audio enters")
    p.add_argument("--vocoder", help="unit vocoder folder (tools/convert_vocoder.py): write speech as wav")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--temperature", type=float, help="sample instead of greedy decoding, at this temperature")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sampling = Sampling(
            greedy=args.temperature is None, temperature=args.temperature or 1.0,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        )  # fmt: skip
        opts = GenerateOptions(
            task=args.task, checkpoint=args.checkpoint, tokenizer=args.tokenizer, hubert=args.hubert,
            layer=args.layer, units=args.units, mode=args.mode, vocoder=args.vocoder, out=args.out,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, sampling=sampling,
        )  # fmt: skip
        requests = read_requests(args.task, args.input)
        if is_hf_export(args.checkpoint):  # transformers serves it in this process: no groups
            run(opts, requests)
            return 0
        _, most = checkpoint_config(args.checkpoint)  # before any process group: a bad path fails alone
    except (ConfigError, FileNotFoundError) as err:
        print(f"generate.py: {err}", file=sys.stderr)
        return 2
    layout = inference_layout(args.tensor_model_parallel_size, args.expert_model_parallel_size)
    initialize(layout, num_experts=most.mamoe.num_experts)
    try:
        run(opts, requests)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
