"""The scoring half of evaluation (megatron_most/eval): normaliser, WER/CER, ZeroSpeech, StoryCloze, QA, report.

Expected values are independent of the code under test: the Whisper normaliser's cases are copied
from openai/whisper tests/test_normalizer.py; WER/CER, ZeroSpeech and StoryCloze numbers are
counted by hand in the comments next to them (CER also by a plain Levenshtein written here).
"""

from __future__ import annotations

import json
import math

import jiwer
import pytest

from megatron_most.eval.normalize import english_spelling_mapping, normalize_answer, text_normalizer
from megatron_most.eval.qa import score_qa
from megatron_most.eval.report import PAPER, markdown_table, write_results
from megatron_most.eval.storycloze import read_storycloze_scores, score_storycloze
from megatron_most.eval.wer import read_hypotheses, read_references, score_asr
from megatron_most.eval.zerospeech import frequency_band, read_scores, score_zerospeech
from megatron_most.rejects import Rejected

# --- normaliser: cases from openai/whisper tests/test_normalizer.py (input, expected) ---------------
WHISPER_CASES = [
    ("two", "2"),
    ("thirty one", "31"),
    ("nineteen ninety nine", "1999"),
    ("two point five million", "2500000"),
    ("200 thousand dollars", "$200000"),
    ("$20 million", "$20000000"),
    ("€52.4 million", "€52400000"),
    ("three thousand twenty nine", "3029"),
    ("thirty first", "31st"),
    ("july third twenty twenty", "july 3rd 2020"),
    ("ninety percent", "90%"),
    ("double oh seven", "007"),
    ("minus 500", "-500"),
    ("two dollars and seventy cents", "$2.70"),
    ("3 cents", "¢3"),
    ("b747", "b 747"),
    ("mobilisation", "mobilization"),
    ("cancelation", "cancellation"),
    ("Let's", "let us"),
    ("she's been like", "she has been like"),
    ("10km", "10 km"),
    ("RC232", "rc 232"),
    ("Mr. Park visited Assoc. Prof. Kim Jr.", "mister park visited associate professor kim junior"),
]


@pytest.mark.parametrize("text,expected", WHISPER_CASES)
def test_english_normalizer_matches_whisper_cases(text, expected):
    assert text_normalizer("en")(text) == expected


def test_spelling_table_and_other_languages():
    mapping = english_spelling_mapping()
    assert len(mapping) == 1739 and mapping["colour"] == "color"
    # Hyphens split words, fillers and bracketed noise tags go, British spellings become American.
    assert text_normalizer("en")("The [noise] well-known colour, uh, twenty-five") == "the well known color 25"
    # Other languages: lower case and punctuation only; no English number or spelling rules, diacritics kept.
    assert text_normalizer("fr")("Héllo, Wörld! [bruit] vingt-cinq (x)") == "héllo wörld vingt cinq"
    assert text_normalizer(None)("  Keep  THIS, as is ") == "Keep THIS, as is"


# --- WER / CER ----------------------------------------------------------------------------------------
REF = "The cat sat on the mat with a red hat"  # 10 words
HYP = "the cat sit on a mat, with red hat."  # sat->sit (S), the->a (S), "a" deleted (D): 3 errors


def levenshtein(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_wer_hand_counted():
    result = score_asr({"u1": REF}, {"u1": HYP})
    assert result["words"] == {"n": 10, "substitutions": 2, "deletions": 1, "insertions": 0}
    assert result["wer"] == pytest.approx(3 / 10)
    # CER over the normalised strings, spaces included: "sat"->"sit" 1 S; "the "->"a " 1 S + 2 D;
    # "a " dropped 2 D: 6 edits over 37 characters.
    ref_norm, hyp_norm = "the cat sat on the mat with a red hat", "the cat sit on a mat with red hat"
    assert levenshtein(ref_norm, hyp_norm) == 6 and len(ref_norm) == 37
    assert result["cer"] == pytest.approx(6 / 37)
    (item,) = result["items"]
    assert item["reference_normalized"] == ref_norm and item["hypothesis_normalized"] == hyp_norm
    assert item["wer"] == pytest.approx(0.3) and result["n_failed"] == 0


def test_wer_is_not_computed_on_glued_words():
    """The release's transform (RemoveWhitespace before splitting) makes each sentence one word."""
    release = jiwer.Compose(
        [
            jiwer.ToLowerCase(),
            jiwer.RemovePunctuation(),
            jiwer.RemoveWhiteSpace(),
            jiwer.RemoveMultipleSpaces(),
            jiwer.Strip(),
            jiwer.ReduceToListOfListOfWords(),
        ]
    )
    refs, hyps = [REF, "Hello there"], [HYP, "hello there"]
    release_wer = jiwer.wer(refs, hyps, reference_transform=release, hypothesis_transform=release)
    ours = score_asr({"u1": refs[0], "u2": refs[1]}, {"u1": hyps[0], "u2": hyps[1]})
    assert release_wer == pytest.approx(1 / 2)  # one wrong "sentence-word" out of two
    assert ours["wer"] == pytest.approx(3 / 12)  # 3 word errors over 10 + 2 reference words
    assert ours["words"]["n"] == 12


def test_wer_empty_reference_and_failed_items():
    references = {"u1": REF, "u2": "uh hmm", "u3": "a b", "u4": "c d"}
    hypotheses = {"u1": HYP, "u2": "okay", "u3": Rejected("decoder produced no tokens"), "u9": "stray"}
    result = score_asr(references, hypotheses, failures=[{"id": None, "reason": "refs.jsonl:7: bad json"}])
    # u2's reference is empty after normalisation (fillers): its one hypothesis word is an insertion.
    assert result["words"] == {"n": 10, "substitutions": 2, "deletions": 1, "insertions": 1}
    assert result["wer"] == pytest.approx(4 / 10)
    assert result["empty_references"] == 1
    assert next(i for i in result["items"] if i["id"] == "u2")["wer"] is None
    reasons = {f["id"]: f["reason"] for f in result["failed"]}
    assert reasons == {
        None: "refs.jsonl:7: bad json",
        "u3": "decoder produced no tokens",
        "u4": "no hypothesis for this id",
        "u9": "no reference for this id",
    }
    assert result["n_scored"] == 2 and result["n_failed"] == 4
    # Nothing scorable: no rate rather than a division by zero.
    assert score_asr({"u": "a"}, {})["wer"] is None


def test_reference_and_hypothesis_readers(tmp_path):
    chapter = tmp_path / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    (chapter / "1089-134686.trans.txt").write_text("1089-134686-0000 HE HOPED THERE\n1089-134686-0001 STUFF IT\n")
    refs, failures = read_references(tmp_path / "test-clean")
    assert refs == {"1089-134686-0000": "HE HOPED THERE", "1089-134686-0001": "STUFF IT"} and failures == []
    manifest = tmp_path / "refs.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.flac", "text": "Hi"}\n{"id": "b", "audio": "b.flac"}\n')
    refs, failures = read_references(manifest)
    assert refs == {"a": "Hi"} and len(failures) == 1 and "refs.jsonl:2" in failures[0]["reason"]
    hyps = tmp_path / "hyps.jsonl"
    hyps.write_text('{"id": "a", "hypothesis": "hi"}\n{"id": "b", "error": "OOM"}\nnot json\n')
    hypotheses, failures = read_hypotheses(hyps)
    assert hypotheses == {"a": "hi", "b": Rejected("OOM")} and len(failures) == 1


# --- ZeroSpeech ---------------------------------------------------------------------------------------
SWUGGY_GOLD = """id,filename,word,phones,correct,frequency,voice,length
1,w1a,brick,b r ih k,1,150,A,4
1,n1a,,b r ih p,0,150,A,4
1,w1b,brick,b r ih k,1,150,B,4
1,n1b,,b r ih p,0,150,B,4
2,w2a,cat,k ae t,1,3,A,3
2,n2a,,k ae p,0,3,A,3
2,w2b,cat,k ae t,1,3,B,3
2,n2b,,k ae p,0,3,B,3
3,w3a,zorb,z ao r b,1,0,A,4
3,n3a,,z ao r p,0,0,A,4
3,w3b,zorb,z ao r b,1,0,B,4
3,n3b,,z ao r p,0,0,B,4
4,w4a,dog,d ao g,1,40,A,3
4,n4a,,d ao p,0,40,A,3
"""
# id 1 (150 -> ">100"): A 3 > 1 -> 1; B 2 == 2 -> 0.5 (tie); id mean 0.75
# id 2 (3 -> "1-5"):    A -5 < -1 -> 0; B: w2b has no score -> failed pair; id mean 0
# id 3 (0 -> "oov"):    A 1 > 0 -> 1; B 4 > 3 -> 1; id mean 1
# id 4: the foil n4a has no score -> its only pair fails -> id 4 not scored
# overall = (0.75 + 0 + 1) / 3 = 7/12; a mean over pairs instead would be (1 + .5 + 0 + 1 + 1) / 5 = 0.7
# in-vocabulary (ids 1, 2) = 0.375
SWUGGY_SCORES = "w1a 3.0\nn1a 1.0\nw1b 2.0\nn1b 2.0\nw2a -5\nn2a -1\nn2b -2\nw3a 1\nn3a 0\nw3b 4\nn3b 3\nw4a 0.5\n"


def test_swuggy_hand_computed(tmp_path):
    (tmp_path / "gold.csv").write_text(SWUGGY_GOLD)
    (tmp_path / "dev.txt").write_text(SWUGGY_SCORES)
    result = score_zerospeech("swuggy", tmp_path / "gold.csv", tmp_path / "dev.txt")
    assert result["accuracy"] == pytest.approx(7 / 12)
    assert result["n_scored"] == 3 and result["n_pairs"] == 5
    assert result["accuracy_in_vocab"] == pytest.approx(0.375)
    assert result["by_frequency"] == {
        "oov": {"n": 1, "accuracy": 1.0},
        "1-5": {"n": 1, "accuracy": 0.0},
        ">100": {"n": 1, "accuracy": 0.75},
    }
    assert [f["reason"] for f in result["failed"]] == ["no score for file w2b", "no score for file n4a"]
    by_id = {item["id"]: item for item in result["items"]}
    assert by_id["1"]["score"] == 0.75 and by_id["4"]["failed"] == "no pair of this id could be scored"
    # The same scores given as a mapping (with paths and extensions) score the same.
    as_dict = dict(line.split() for line in SWUGGY_SCORES.splitlines())
    as_dict = {f"lexical/dev/{k}.wav": float(v) for k, v in as_dict.items()}
    assert score_zerospeech("swuggy", tmp_path / "gold.csv", as_dict)["accuracy"] == pytest.approx(7 / 12)
    # A NaN score fails its pair instead of counting as a loss: id 1 keeps only voice B's tie.
    as_dict["lexical/dev/w1a.wav"] = float("nan")
    with_nan = score_zerospeech("swuggy", tmp_path / "gold.csv", as_dict)
    assert with_nan["accuracy"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert "NaN" in with_nan["failed"][0]["reason"]


def test_frequency_bands_follow_the_official_cut():
    # pandas.cut(bins=[0, 1, 5, 20, 100, inf], right=False) with the official labels.
    assert [frequency_band(str(n)) for n in (0, 1, 4, 5, 19, 20, 99, 100)] == [
        "oov", "1-5", "1-5", "6-20", "6-20", "21-100", "21-100", ">100"
    ]  # fmt: skip
    assert frequency_band("") is None


def test_sblimp_hand_computed_and_bad_score_lines(tmp_path):
    (tmp_path / "gold.csv").write_text(
        "id,filename,voice,type,subtype,correct,transcription\n"
        "10,s10a,A,morphology,anaphor_gender,1,himself saw him\n"
        "10,x10a,A,morphology,anaphor_gender,0,herself saw him\n"
        "10,s10b,B,morphology,anaphor_gender,1,himself saw him\n"
        "10,x10b,B,morphology,anaphor_gender,0,herself saw him\n"
        "11,s11a,A,morphology,anaphor_gender,1,she saw herself\n"
        "11,x11a,A,morphology,anaphor_gender,0,she saw himself\n"
        "20,s20a,A,syntax,island,1,what did he see\n"
        "20,x20a,A,syntax,island,0,what he did see\n"
    )
    # id 10: A 0.5 > 0.1 -> 1, B 0.1 < 0.5 -> 0: 0.5; id 11: tie -> 0.5; id 20: 1. Overall 2/3.
    (tmp_path / "dev.txt").write_text(
        "s10a 0.5\nx10a 0.1\ns10b 0.1\nx10b 0.5\ns11a -7\nx11a -7\ns20a 2\nx20a 1\nstray 1\n"
        "a line with four fields\nbad notanumber\n"
    )
    result = score_zerospeech("sblimp", tmp_path / "gold.csv", tmp_path / "dev.txt")
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["by_subtype"] == {"anaphor_gender": {"n": 2, "accuracy": 0.5}, "island": {"n": 1, "accuracy": 1.0}}
    assert result["by_type"]["syntax"] == {"n": 1, "accuracy": 1.0}
    assert result["unused_scores"] == 1  # "stray"
    assert len(result["failed"]) == 1 and "four fields" in result["failed"][0]["reason"]


def test_read_scores_flags_duplicates_and_nan(tmp_path):
    path = tmp_path / "dev.txt"
    path.write_text("a 1.0\nb nan\na 2.0\nc -3e2\n")
    scores, bad = read_scores(path)
    assert scores == {"c": -300.0}
    assert "scored twice" in bad["a"] and "NaN" in bad["b"]


# --- StoryCloze ---------------------------------------------------------------------------------------
STORIES = {
    # sum: -12 < -10 -> 0;  mean: -12/6 = -2 > -10/4 = -2.5 -> 1  (the flip)
    "s1": {"positive": {"logprob": -12.0, "units": 6}, "negative": {"logprob": -10.0, "units": 4}},
    # sum: -3 > -6 -> 1;    mean: -1 > -2 -> 1
    "s2": {"positive": {"logprob": -3.0, "units": 3}, "negative": {"logprob": -6.0, "units": 3}},
    # tie both ways -> 0.5
    "s3": {"positive": {"logprob": -4.0, "units": 2}, "negative": {"logprob": -4.0, "units": 2}},
    "s4": Rejected("CUDA out of memory"),
    "s5": {"positive": {"logprob": -1.0}, "negative": {"logprob": -2.0, "units": 1}},
}


def test_storycloze_sum_and_mean_disagree_on_hand_example():
    by_sum = score_storycloze(STORIES, reduction="sum")
    by_mean = score_storycloze(STORIES, reduction="mean", task="topic_storycloze")
    assert by_sum["accuracy"] == pytest.approx(1.5 / 3) and by_sum["reduction"] == "sum"
    assert by_mean["accuracy"] == pytest.approx(2.5 / 3) and by_mean["reduction"] == "mean"
    assert by_sum["ties"] == by_mean["ties"] == 1
    reasons = {f["id"]: f["reason"] for f in by_sum["failed"]}
    assert reasons["s4"] == "CUDA out of memory" and "units" in reasons["s5"] and len(reasons) == 2


def test_storycloze_scores_file(tmp_path):
    path = tmp_path / "scores.jsonl"
    lines = [json.dumps({"id": k, **v}) for k, v in STORIES.items() if not isinstance(v, Rejected)]
    lines += ['{"id": "s4", "error": "CUDA out of memory"}', "{broken", json.dumps({"id": "s2", **STORIES["s2"]})]
    path.write_text("\n".join(lines) + "\n")
    items, failures = read_storycloze_scores(path)
    result = score_storycloze(items, reduction="sum", failures=failures)
    # s2 is listed twice, so it is not scored: s1 -> 0, s3 -> 0.5
    assert result["accuracy"] == pytest.approx(0.25) and result["n_scored"] == 2
    assert result["n_failed"] == 4  # s2 (twice), s4, s5, the broken line


# --- QA -----------------------------------------------------------------------------------------------
def test_qa_normalised_containment():
    answers = {
        "q1": ["Paris"],
        "q2": ["25", "twenty-five"],
        "q3": ["no"],
        "q4": ["George Washington"],
        "q5": ["colour"],
        "q6": ["Rome"],
        "q7": ["The"],
    }
    predictions = {
        "q1": "The capital of France is Paris.",  # contained
        "q2": "It is twenty five years.",  # number words normalised to "25"
        "q3": "I know the answer",  # "no" is not a word of the prediction
        "q4": "Washington",  # only part of the answer
        "q5": "The color red",  # British/American spelling
        "q6": Rejected("generation timed out"),
        "q7": "anything",  # the answer is only an article: would match everything
        "q8": "no question for this",
    }
    result = score_qa(predictions, answers, modality="speech")
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert {i["id"]: i["correct"] for i in result["items"] if "correct" in i} == {
        "q1": True, "q2": True, "q3": False, "q4": False, "q5": True
    }  # fmt: skip
    assert {f["id"] for f in result["failed"]} == {"q6", "q7", "q8"}
    assert normalize_answer("The Colour of the sea") == "color of sea"


# --- report -------------------------------------------------------------------------------------------
def test_report_json_and_markdown(tmp_path):
    results = {
        "asr_librispeech_clean": score_asr({"u1": REF}, {"u1": HYP}),
        "storycloze": score_storycloze(STORIES, reduction="mean"),
        "custom_task": {"metric": "accuracy", "accuracy": None, "n_scored": 0, "n_failed": 2},
    }
    paths = write_results(results, tmp_path)
    summary = json.loads(paths["json"].read_text())
    assert "items" not in summary["asr_librispeech_clean"]
    assert summary["asr_librispeech_clean"]["wer"] == pytest.approx(0.3) and summary["storycloze"]["paper"] == 65.43
    items = [json.loads(line) for line in paths["asr_librispeech_clean.items"].read_text().splitlines()]
    assert items[0]["hypothesis"] == HYP
    table = paths["markdown"].read_text()
    assert table == markdown_table(results)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert "| WER | 30.00 | 2.00 | 1 | 0 |" in rows[PAPER["asr_librispeech_clean"][0]]
    assert "| accuracy | 83.33 | 65.43 | 3 | 2 | mean log-likelihood |" in rows["sStoryCloze"]
    assert "| — | — | 0 | 2 |" in rows["custom_task"]
    assert not math.isnan(summary["storycloze"]["accuracy"])
