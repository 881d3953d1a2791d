"""Tokenizers and prompt templates: token ids and loss masks built by hand from tokenizer pieces."""

import numpy as np
import pytest
import torch

from megatron_most.data.manifest import InstructSample, SpeechSample, TextSample, Turn
from megatron_most.data.templates import AudioSegment, RenderError, TemplateOptions, audio_refs, render
from megatron_most.data.tokenizer import load_tokenizer
from megatron_most.model.vocab import TokenLayout
from megatron_most.options import ConfigError
from tests.speech import hf_tokenizer, sentencepiece_model

ASR = "Transcribe the following speech into text."
TTS = "Convert the following text into speech."
NUM_UNITS = 20


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return sentencepiece_model(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    return hf_tokenizer(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module", params=["sentencepiece", "hf"])
def tok(request, sp_path, hf_path):
    return load_tokenizer(sp_path if request.param == "sentencepiece" else hf_path)


def layout_for(tok):
    return TokenLayout(text_vocab_size=tok.vocab_size + 5, num_units=NUM_UNITS)


# ---------------------------------------------------------------- tokenizers


def test_sentencepiece_matches_library(sp_path):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_path))
    tok = load_tokenizer(sp_path)
    assert (
        (tok.vocab_size, tok.bos, tok.eos)
        == (ref.get_piece_size(), ref.bos_id(), ref.eos_id())
        == (ref.get_piece_size(), 1, 2)
    )
    text = "the quick brown fox speaks, unseen words too"
    assert tok.encode(text) == ref.encode(text, out_type=int)
    assert tok.bos not in tok.encode(text) and tok.eos not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text, out_type=int))


def test_hugging_face_matches_library(hf_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(hf_path))
    tok = load_tokenizer(hf_path)
    assert (tok.vocab_size, tok.bos, tok.eos) == (
        len(ref),
        ref.convert_tokens_to_ids("<bos>"),
        ref.convert_tokens_to_ids("<eos>"),
    )
    text = "hello world\n\nOutput: the lazy dog"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    literal = "a <bos> typed in data"  # must stay text: only templates place special tokens
    assert tok.encode(literal) == ref.encode(literal, add_special_tokens=False, split_special_tokens=True)
    assert tok.bos not in tok.encode(literal) and tok.decode(tok.encode(literal)) == literal


def test_hugging_face_added_bos_eos_beyond_base_vocab(tmp_path):
    """DeepSeek-style: bos/eos are added tokens after the base vocabulary; vocab_size must cover them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.train_from_iterator(
        ["speech and text"] * 4,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=base)
    fast.add_special_tokens({"bos_token": "<|begin_of_sentence|>", "eos_token": "<|end_of_sentence|>"})
    fast.save_pretrained(tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert ref.vocab_size == base.get_vocab_size() and len(ref) == ref.vocab_size + 2
    assert (tok.vocab_size, tok.bos, tok.eos) == (len(ref), ref.vocab_size, ref.vocab_size + 1)


def test_tokenizer_pickles_for_worker_processes(tok):
    import pickle

    copy = pickle.loads(pickle.dumps(tok))
    text = "numbers like seven"
    assert (copy.vocab_size, copy.bos, copy.eos, copy.encode(text)) == (
        tok.vocab_size,
        tok.bos,
        tok.eos,
        tok.encode(text),
    )


def test_tokenizer_errors(tmp_path):
    import sentencepiece as spm

    with pytest.raises(ConfigError, match="no such file"):
        load_tokenizer(tmp_path / "absent.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "corpus.txt").write_text("speech and text share one model\n" * 20)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(tmp_path / "nobos"),
        vocab_size=30,
        hard_vocab_limit=False,
        bos_id=-1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    with pytest.raises(ConfigError, match="no bos token"):
        load_tokenizer(tmp_path / "nobos.model")


# ---------------------------------------------------------------- rendering


def units_ids(layout, units):
    return [layout.boa, *(int(layout.unit(int(k))) for k in units), layout.eoa]


def feature_ids(layout, frames):
    return [layout.boa, *[layout.feature] * frames, layout.eoa]


def check(rendered, pieces, layout, spans=None):
    """pieces: list of (ids, target); compares tokens and loss mask and runs TokenLayout.validate."""
    tokens = [t for ids, _ in pieces for t in ids]
    mask = [int(target) for ids, target in pieces for _ in ids]
    assert rendered.tokens.dtype == np.int32 and rendered.loss_mask.dtype == np.uint8
    assert rendered.tokens.tolist() == tokens
    assert rendered.loss_mask.tolist() == mask
    layout.validate(
        torch.from_numpy(rendered.tokens.astype(np.int64))[None],
        max_length=len(tokens),
        feature_spans=None if spans is None else torch.tensor(spans),
    )


def segment(seed, n_units=6, frames=None, dim=8):
    rng = np.random.default_rng(seed)
    return AudioSegment(
        units=rng.integers(0, NUM_UNITS, n_units),
        features=None if frames is None else rng.standard_normal((frames, dim)).astype(np.float32),
    )


@pytest.mark.parametrize("mode", ["units", "features"])
def test_asr(tok, mode):
    layout, options = layout_for(tok), TemplateOptions()
    sample = SpeechSample("u1", "/a/u1.wav", "the lazy dog")
    seg = segment(0, frames=7)
    out = render("asr", sample, {"/a/u1.wav": seg}, tok, layout, options, mode=mode)
    audio = units_ids(layout, seg.units) if mode == "units" else feature_ids(layout, 7)
    check(
        out,
        [
            ([tok.bos], 0),
            (tok.encode(ASR + "\n\n"), 0),
            (audio, 0),
            ([tok.eos], 0),
            (tok.encode("\n\nOutput: "), 0),
            ([tok.bos], 1),
            (tok.encode("the lazy dog"), 1),
            ([tok.eos], 1),
        ],
        layout,
        spans=[7] if mode == "features" else None,
    )
    if mode == "units":
        assert out.features is None
    else:
        assert out.features.dtype == np.float16
        np.testing.assert_array_equal(out.features, seg.features.astype(np.float16))


@pytest.mark.parametrize("mode", ["units", "features"])
def test_tts_response_is_units_in_both_modes(tok, mode):
    layout = layout_for(tok)
    sample = SpeechSample("u2", "/a/u2.flac", "hello world")
    seg = segment(1, n_units=9, frames=4 if mode == "features" else None)
    out = render("tts", sample, {"/a/u2.flac": seg}, tok, layout, TemplateOptions(), mode=mode)
    check(
        out,
        [
            ([tok.bos], 0),
            (tok.encode(TTS + "\n\nhello world"), 0),
            ([tok.eos], 0),
            (tok.encode("\n\nOutput: "), 0),
            ([tok.bos], 1),
            (units_ids(layout, seg.units), 1),
            ([tok.eos], 1),
        ],
        layout,
    )
    assert out.features is None


def test_tts_features_mode_without_units_is_a_config_error(tok):
    seg = AudioSegment(units=None, features=np.zeros((5, 8), np.float16))
    with pytest.raises(ConfigError, match="codebook"):
        render(
            "tts",
            SpeechSample("u", "/x.wav", "hi"),
            {"/x.wav": seg},
            tok,
            layout_for(tok),
            TemplateOptions(),
            mode="features",
        )


def test_lm_trains_on_every_token_after_the_first(tok):
    layout = layout_for(tok)
    text = "speech and text <bos> stay text"  # a literal "<bos>" in data is text, not the special token
    out = render("lm", TextSample("t", text), {}, tok, layout, TemplateOptions(), mode="units")
    check(out, [([tok.bos], 0), (tok.encode(text), 1), ([tok.eos], 1)], layout)
    assert out.tokens.tolist().count(tok.bos) == 1


def test_instruct_multi_turn_features(tok):
    layout, options = layout_for(tok), TemplateOptions()
    sample = InstructSample(
        "c",
        (
            Turn("system", text="answer briefly"),
            Turn("user", audio="/q1.wav"),
            Turn("assistant", text="a fox"),
            Turn("user", text="and again"),
            Turn("assistant", audio="/a2.wav"),
            Turn("user", audio="/q3.wav"),
            Turn("assistant", text="done"),
        ),
    )
    audio = {"/q1.wav": segment(2, frames=3), "/a2.wav": segment(3, n_units=4), "/q3.wav": segment(4, frames=5)}
    assert audio_refs("instruct", sample) == [("/q1.wav", False), ("/a2.wav", True), ("/q3.wav", False)]
    out = render("instruct", sample, audio, tok, layout, options, mode="features")
    out_prompt = tok.encode("\n\nOutput: ")
    check(
        out,
        [
            ([tok.bos], 0),
            (tok.encode("answer briefly\n\n"), 0),
            (feature_ids(layout, 3), 0),
            ([tok.eos], 0),
            (out_prompt, 0),
            ([tok.bos], 1),
            (tok.encode("a fox"), 1),
            ([tok.eos], 1),
            ([tok.bos], 0),
            (tok.encode("answer briefly\n\nand again"), 0),
            ([tok.eos], 0),
            (out_prompt, 0),
            ([tok.bos], 1),
            (units_ids(layout, audio["/a2.wav"].units), 1),
            ([tok.eos], 1),
            ([tok.bos], 0),
            (tok.encode("answer briefly\n\n"), 0),
            (feature_ids(layout, 5), 0),
            ([tok.eos], 0),
            (out_prompt, 0),
            ([tok.bos], 1),
            (tok.encode("done"), 1),
            ([tok.eos], 1),
        ],
        layout,
        spans=[3, 5],
    )
    expected = np.concatenate([audio["/q1.wav"].features, audio["/q3.wav"].features]).astype(np.float16)
    np.testing.assert_array_equal(out.features, expected)
    assert int((out.tokens == layout.feature).sum()) == out.features.shape[0] == 8
    assert not out.loss_mask[out.tokens == layout.feature].any()


def test_instruct_without_system_uses_chat_instruction(tok):
    layout = layout_for(tok)
    options = TemplateOptions(chat_instruction="Help.")
    sample = InstructSample("c", (Turn("user", text="hi"), Turn("assistant", text="hello")))
    out = render("instruct", sample, {}, tok, layout, options, mode="units")
    check(
        out,
        [
            ([tok.bos], 0),
            (tok.encode("Help.\n\nhi"), 0),
            ([tok.eos], 0),
            (tok.encode("\n\nOutput: "), 0),
            ([tok.bos], 1),
            (tok.encode("hello"), 1),
            ([tok.eos], 1),
        ],
        layout,
    )
    with pytest.raises(RenderError, match="user/assistant pairs"):
        render("instruct", InstructSample("d", (Turn("user", text="q"),)), {}, tok, layout, options, mode="units")


def test_custom_templates(tok):
    layout = layout_for(tok)
    options = TemplateOptions(prompt="Q: {input}\nA:", response=" {output}<eos>", lm="{text}")
    sample = SpeechSample("u", "/u.wav", "yes")
    seg = segment(5)
    out = render("asr", sample, {"/u.wav": seg}, tok, layout, options, mode="units")
    check(
        out,
        [
            (tok.encode("Q: "), 0),
            (units_ids(layout, seg.units), 0),
            (tok.encode("\nA:"), 0),
            (tok.encode(" yes"), 1),
            ([tok.eos], 1),
        ],
        layout,
    )
    out = render("lm", TextSample("t", "plain text"), {}, tok, layout, options, mode="units")
    ids = tok.encode("plain text")
    assert out.tokens.tolist() == ids and out.loss_mask.tolist() == [0] + [1] * (len(ids) - 1)


def test_audio_refs():
    speech = SpeechSample("u", "/u.wav", "t")
    assert audio_refs("asr", speech) == [("/u.wav", False)]
    assert audio_refs("tts", speech) == [("/u.wav", True)]
    assert audio_refs("lm", TextSample("t", "x")) == []
    with pytest.raises(ConfigError, match="task='lm' needs TextSample"):
        audio_refs("lm", speech)
    with pytest.raises(ConfigError, match="task='s2s'"):
        audio_refs("s2s", speech)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("prompt", "<bos>{instruction}<eos>", "TemplateOptions.prompt=.*missing placeholder {input}"),
        ("response", "<bos><eos>", "TemplateOptions.response=.*missing placeholder {output}"),
        ("lm", "<bos>{txt}<eos>", "TemplateOptions.lm=.*unknown placeholder {txt}"),
        ("prompt", "{input}{input}", "appears twice"),
        ("prompt", "{input", "literal braces"),
        ("prompt", "{input!r}", "unknown placeholder"),
    ],
)
def test_template_validation(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TemplateOptions(**{field: value})


def test_options_from_dict_names_unknown_field():
    with pytest.raises(ConfigError, match="did you mean 'asr_instruction'"):
        TemplateOptions.from_dict({"asr_instuction": "x"})
    assert TemplateOptions.from_dict({"prompt": "{{literal}} {input}"}).prompt == "{{literal}} {input}"


def test_literal_braces_render_once(tok):
    layout = layout_for(tok)
    out = render(
        "asr",
        SpeechSample("u", "/u.wav", "x"),
        {"/u.wav": segment(6)},
        tok,
        layout,
        TemplateOptions(prompt="{{a}} {input}"),
        mode="units",
    )
    assert out.tokens.tolist()[: len(tok.encode("{a} "))] == tok.encode("{a} ")


def test_render_errors(tok):
    layout, options = layout_for(tok), TemplateOptions()
    sample = SpeechSample("u", "/u.wav", "x")
    with pytest.raises(RenderError, match="not loaded"):
        render("asr", sample, {}, tok, layout, options, mode="units")
    bad = AudioSegment(units=np.array([0, NUM_UNITS]))
    with pytest.raises(RenderError, match=r"\[0, 20\)"):
        render("asr", sample, {"/u.wav": bad}, tok, layout, options, mode="units")
    with pytest.raises(ConfigError, match="units mode needs unit ids"):
        render("asr", sample, {"/u.wav": AudioSegment(features=np.zeros((3, 4)))}, tok, layout, options, mode="units")
    with pytest.raises(ConfigError, match="mode='features' needs HuBERT features"):
        render("asr", sample, {"/u.wav": segment(7)}, tok, layout, options, mode="features")
    with pytest.raises(RenderError, match="differ in dimension"):
        two = InstructSample(
            "c",
            (
                Turn("user", audio="/a"),
                Turn("assistant", text="x"),
                Turn("user", audio="/b"),
                Turn("assistant", text="y"),
            ),
        )
        render(
            "instruct",
            two,
            {"/a": segment(8, frames=2, dim=4), "/b": segment(9, frames=2, dim=6)},
            tok,
            layout,
            options,
            mode="features",
        )
    with pytest.raises(ConfigError, match="mode='wave'"):
        render("asr", sample, {"/u.wav": segment(7)}, tok, layout, options, mode="wave")
    with pytest.raises(ConfigError, match="do not fit text_vocab_size"):
        render("lm", TextSample("t", "x"), {}, tok, TokenLayout(tok.vocab_size - 1, NUM_UNITS), options, mode="units")
    with pytest.raises(ConfigError, match="audio=False"):
        render(
            "asr",
            sample,
            {"/u.wav": segment(7)},
            tok,
            TokenLayout(tok.vocab_size, 0, audio=False),
            options,
            mode="units",
        )
