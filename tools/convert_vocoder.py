"""Convert a public unit HiFi-GAN (CodeHiFiGAN) vocoder checkpoint to safetensors, once.

    python tools/convert_vocoder.py --checkpoint g_00500000 --config config.json --out vocoder/

Reads the original checkpoint ({"generator": state_dict} saved by torch.save; loaded with
weights_only=True, so nothing is unpickled but tensors) and its config.json, folds the weight norm
(weight_g, weight_v -> weight) and writes vocoder/model.safetensors + vocoder/config.json, which
megatron_most.audio.vocoder.load_vocoder("vocoder/") reads. Prints one JSON summary line; a
checkpoint that does not match its config (missing / unexpected keys, unknown config keys, F0 or
d-vector inputs this generator does not implement) exits 2 with the offending names.
"""

import argparse
import json
import sys

from megatron_most.audio.vocoder import convert
from megatron_most.options import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="original generator checkpoint (e.g. g_00500000)")
    p.add_argument("--config", required=True, help="the checkpoint's config.json")
    p.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = convert(args.checkpoint, args.config, args.out)
    except ConfigError as err:
        print(f"convert_vocoder.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
