"""A MoST Hugging Face export (`convert_checkpoint.py megatron-to-hf --format most`: remote code)
served by transformers' `generate()`, behind the same interface as the Megatron model in
inference/run.py: `tokens`, `most` and `generate(prompts, ...)`.

One process, no Megatron groups. Prompts go in as one left-padded batch with its attention
mask and the batch's `<feat>` frames in row order (the remote code fills the placeholders in
that order); `<feat>` and the table's padding rows are suppressed, as our generation never
produces them, so greedy outputs equal ours token for token (tests/test_generate.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from megatron_most.convert.hf_config import config_from_hf
from megatron_most.inference.generate import Prompt, Sampling
from megatron_most.model.config import MoSTConfig, preset
from megatron_most.options import ConfigError


def is_hf_export(path) -> bool:
    """A folder with a MoST-format config.json (and no torch_dist metadata)."""
    config = Path(path) / "config.json"
    if not config.is_file() or (Path(path) / "metadata.json").is_file():
        return False
    return json.loads(config.read_text()).get("model_type") == "most"


class HFExport:
    def __init__(self, path):
        raw = json.loads((Path(path) / "config.json").read_text())
        # The export's config.json holds the whole architecture; the preset only fills what HF
        # configs do not carry (training settings), which generation does not read.
        self.most: MoSTConfig = config_from_hf(raw, preset("deepseek_v2_lite_most"))
        self.tokens = self.most.tokens
        self.model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).float().eval()
        if type(self.model).__name__ != "MoSTForCausalLM":
            raise ConfigError(f"{path}: loads as {type(self.model).__name__}, not a MoST export")

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], *, max_new_tokens: int, eos_id, sampling: Sampling) -> list[list[int]]:
        width = max(len(p.ids) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt.ids) :] = torch.tensor(prompt.ids)
            mask[row, width - len(prompt.ids) :] = 1
        features = [p.features for p in prompts if p.features is not None]
        extra = {"audio_features": torch.cat(features).float()} if features else {}
        suppress = [self.tokens.feature, *range(self.tokens.size, self.tokens.padded_size)] if self.tokens.audio else []
        if not sampling.greedy:
            torch.manual_seed(sampling.seed)  # transformers samples from the global generator
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_k=sampling.top_k or None,
            top_p=sampling.top_p if not sampling.greedy else None,
            eos_token_id=eos_id,
            pad_token_id=eos_id if eos_id is not None else 0,
            suppress_tokens=suppress or None,
            **extra,
        )
        return [_until_eos(row[width:].tolist(), eos_id) for row in out]


@torch.no_grad()
def hf_log_likelihood(export: HFExport, items: list[tuple[list[int], int]]) -> list[tuple[float, int]]:
    """inference.score.log_likelihood on the export: (summed log-probability, tokens) of ids[first:]."""
    out = []
    for ids, first in items:
        x = torch.tensor([ids])
        logp = torch.log_softmax(export.model(input_ids=x).logits[0, :-1].float(), dim=-1)
        out.append((logp.gather(-1, x[0, 1:, None])[first - 1 :].sum().item(), len(ids) - first))
    return out


def _until_eos(ids: list[int], eos_id) -> list[int]:
    """The new ids up to and with the first eos (generate pads finished rows after it)."""
    return ids[: ids.index(eos_id) + 1] if eos_id is not None and eos_id in ids else ids
