"""Inference on what users have: prompts as training renders them, outputs decoded, a checkpoint
written by the pretraining loop loaded at another layout, and log-likelihood scores.

References: `data.templates.render` (the training sample; its prompt is the part before the
first target), hand-built id sequences, one-rank generation for the EP2 run, and per-item
unpadded forwards for the batched scores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_most.data.manifest import InstructSample, SpeechSample, Turn
from megatron_most.data.templates import AudioSegment, TemplateOptions, render
from megatron_most.data.tokenizer import load_tokenizer
from megatron_most.inference.tasks import build_prompt, decode
from megatron_most.model.config import preset
from tests.multiproc import run_distributed
from tests.packed_data import write_tiny_blend
from tests.speech import sentencepiece_model
from tests.test_pretrain import argv, train


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(sentencepiece_model(tmp_path_factory.mktemp("sp")))


def _prompt_part(rendered) -> list[int]:
    first_target = int(np.argmax(rendered.loss_mask))
    return rendered.tokens[:first_target].tolist()


def test_prompts_are_what_training_renders_before_the_response(tok):
    layout, options = preset("tiny").tokens, TemplateOptions()
    audio = {"a.wav": AudioSegment(units=np.array([3, 1, 4]), features=np.random.rand(5, 16).astype(np.float16))}
    speech = SpeechSample(id="u1", audio="a.wav", text="the cat sat")
    for task, mode, value in (("asr", "features", {"audio": "a.wav"}), ("asr", "units", {"audio": "a.wav"})):
        prompt = build_prompt(task, value, audio, tok, layout, options, mode=mode)
        assert prompt.ids == _prompt_part(render("asr", speech, audio, tok, layout, options, mode=mode))
    assert (prompt.features is None) and build_prompt(
        "asr", {"audio": "a.wav"}, audio, tok, layout, options, mode="features"
    ).features.shape == (5, 16)
    tts = build_prompt("tts", "the cat sat", audio, tok, layout, options, mode="units")
    assert tts.ids == _prompt_part(render("tts", speech, audio, tok, layout, options, mode="units"))
    chat = InstructSample(id="c1", turns=[Turn("user", text="hello there"), Turn("assistant", text="hi")])
    assert build_prompt("chat", "hello there", audio, tok, layout, options, mode="units").ids == _prompt_part(
        render("instruct", chat, audio, tok, layout, options, mode="units")
    )
    assert build_prompt("continue", {"audio": "a.wav"}, audio, tok, layout, options, mode="units").ids == [
        layout.boa,
        *(layout.unit(u) for u in (3, 1, 4)),
    ]


def test_outputs_decode_to_text_and_units(tok):
    layout = preset("tiny").tokens
    ids = [tok.bos, *tok.encode("the cat sat"), layout.boa, layout.unit(3), layout.unit(7), layout.eoa, tok.eos]
    out = decode(ids, tok, layout)
    assert (out.text, out.units, out.ids) == ("the cat sat", [3, 7], ids)


def _load_and_run(checkpoint, prompts_ids, tp=1):
    import os

    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_most.inference import Prompt, generate
    from megatron_most.inference.load import inference_layout, load_model
    from megatron_most.inference.score import log_likelihood
    from megatron_most.platform import initialize

    world = int(os.environ["WORLD_SIZE"])
    initialize(inference_layout(tp, world // tp), num_experts=8)
    model = load_model(checkpoint)
    tokens = generate(model, [Prompt(ids) for ids in prompts_ids], max_new_tokens=6, eos_id=None)
    items = [(ids + new, len(ids)) for ids, new in zip(prompts_ids, tokens, strict=True)]
    scores = log_likelihood(model, items, batch_size=3)
    singles = []
    with torch.no_grad():  # the reference: one unpadded forward per item
        for ids, first in items:
            x = torch.tensor([ids])
            logits = gather_from_tensor_model_parallel_region(model(x, torch.arange(len(ids))[None], None))
            logp = torch.log_softmax(logits[0, :-1].float(), -1)
            singles.append(logp.gather(-1, x[0, 1:, None]).squeeze(-1)[first - 1 :].sum().item())
    return tokens, scores, singles


@pytest.mark.slow
def test_a_pretraining_checkpoint_generates_and_scores_at_one_rank_ep2_and_tp2(tmp_path):
    blend = write_tiny_blend(tmp_path / "data", sizes=(60, 60, 90))
    data = [blend[name][0] for name in ("asr", "tts", "text")]
    out = tmp_path / "run"
    assert train(argv(data, out, 3, "--expert-model-parallel-size", "2"), 2) == [0, 0]  # saved at EP2
    layout = preset("tiny").tokens
    prompts = [[5, 9, 17, layout.boa, layout.unit(2), layout.unit(4)], [7, 7, 30], [layout.boa, layout.unit(1)]]
    one = run_distributed(_load_and_run, 1, args=(str(out), prompts), timeout_s=300)[0]
    two = run_distributed(_load_and_run, 2, args=(str(out), prompts), timeout_s=300)
    tp2 = run_distributed(_load_and_run, 2, args=(str(out), prompts, 2), timeout_s=300)
    tokens, scores, singles = one
    assert all(len(row) == 6 for row in tokens)
    assert two[0][0] == tokens and two[1][0] == tokens  # EP2 generates what one rank generates
    assert tp2[0][0] == tokens and tp2[1][0] == tokens  # and so does TP2
    assert [n for _, n in scores] == [6, 6, 6]
    assert np.allclose([s for s, _ in scores], singles, atol=1e-4), (scores, singles)
    assert np.allclose([s for s, _ in two[0][1]], singles, atol=1e-4)
