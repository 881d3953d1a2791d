"""JSONL manifests: each kind of bad line becomes a Rejected naming the problem; good lines survive."""

import json
from pathlib import Path

import pytest

from megatron_most.data.manifest import InstructSample, SpeechSample, TextSample, Turn, read_manifest
from megatron_most.options import ConfigError
from megatron_most.rejects import Rejected, RejectsWriter
from tests.speech import make_corpus, make_text_corpus


def write(path: Path, lines: list) -> Path:
    """Write lines (dicts as JSON, str as text, bytes verbatim) as a JSONL file."""
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path


def read(path: Path, kind: str) -> dict[int, object]:
    return dict(read_manifest(path, kind))


def reason(result) -> str:
    assert isinstance(result, Rejected), result
    return result.reason


def test_speech_manifest_of_real_corpus(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", n=3)
    expected = [json.loads(line) for line in manifest.read_text().splitlines()]
    got = list(read_manifest(manifest, "speech"))
    assert [line for line, _ in got] == [1, 2, 3]
    for (_, sample), record in zip(got, expected):
        assert sample == SpeechSample(
            id=record["id"], audio=record["audio"], text=record["text"], speaker=record["speaker"], duration=None
        )
        assert Path(sample.audio).is_file()


def test_speech_fields_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write(
        tmp_path / "sub" / "m.jsonl",
        [
            {"id": "a", "audio": "wav/a.wav", "text": "hello", "speaker": "s1", "duration": 1.5},
            {"id": 7, "audio": "/abs/b.flac", "text": "x", "speaker": "", "duration": 2},
        ],
    )
    got = read(path, "speech")
    assert got[1] == SpeechSample("a", str((tmp_path / "sub" / "wav" / "a.wav").resolve()), "hello", "s1", 1.5)
    assert got[2] == SpeechSample("7", "/abs/b.flac", "x", None, 2.0)


def test_speech_bad_lines_are_rejected_one_by_one(tmp_path):
    good = {"id": "ok", "audio": "a.wav", "text": "fine"}
    path = write(
        tmp_path / "m.jsonl",
        [
            good,  # 1
            '{"id": "x", "audio": "a.wav", "text": ',  # 2 truncated
            "[1, 2]",  # 3 not an object
            {"id": "x", "text": "t"},  # 4 missing audio
            {"id": "x", "audio": "a.wav", "text": "   "},  # 5 empty text
            {"id": "x", "audio": "a.wav", "text": 5},  # 6 wrong type
            b'{"id": "x", "audio": "a.wav", "text": "caf\xe9"}',  # 7 latin-1 byte
            {"audio": "a.wav", "text": "t"},  # 8 missing id
            {"id": "x", "audio": "a.wav", "text": "t", "duration": -1},  # 9 bad duration
            {"id": "x", "audio": "a.wav", "text": "t", "duration": "3s"},  # 10
            '{"id": "x", "audio": "a.wav", "text": "\\ud800"}',  # 11 lone surrogate
            "",  # 12 blank: skipped
            {"id": "x", "audio": "", "text": "t"},  # 13 empty audio
            good,  # 14
        ],
    )
    got = read(path, "speech")
    assert 12 not in got
    assert isinstance(got[1], SpeechSample) and isinstance(got[14], SpeechSample)
    assert reason(got[2]).startswith("not JSON")
    assert "not a JSON object" in reason(got[3]) and "list" in reason(got[3])
    assert reason(got[4]) == "missing field 'audio'"
    assert reason(got[5]) == "empty field 'text'"
    assert reason(got[6]) == "field 'text' must be a string, got int"
    assert "not valid UTF-8" in reason(got[7]) and "0xe9" in reason(got[7])
    assert reason(got[8]) == "missing field 'id'"
    assert "duration" in reason(got[9]) and "positive" in reason(got[9])
    assert reason(got[10]) == "field 'duration' must be a number of seconds, got string"
    assert "field 'text'" in reason(got[11]) and "surrogate" in reason(got[11])
    assert reason(got[13]) == "empty field 'audio'"


def test_text_manifest_and_default_ids(tmp_path):
    corpus = make_text_corpus(tmp_path / "t.jsonl", n=4)
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert [s for _, s in read_manifest(corpus, "text")] == [TextSample(r["id"], r["text"]) for r in records]
    path = write(tmp_path / "plain.jsonl", [{"text": "one"}, {"text": ""}, {"txt": "two"}, {"id": "k", "text": "3"}])
    got = read(path, "text")
    assert got[1] == TextSample("plain.jsonl:1", "one")
    assert reason(got[2]) == "empty field 'text'"
    assert reason(got[3]) == "missing field 'text'"
    assert got[4] == TextSample("k", "3")


def test_utf8_bom_on_first_line_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hi"}).encode() + b"\n")
    assert read(path, "text")[1] == TextSample("bom.jsonl:1", "hi")


def test_instruct_turn_forms(tmp_path):
    path = write(
        tmp_path / "chat.jsonl",
        [
            {
                "id": "c1",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "audio": "q.wav"},
                    {"role": "assistant", "content": "yes"},
                    {"role": "user", "content": {"audio": "/abs/q2.wav"}},
                    {"role": "assistant", "audio": "a2.wav"},
                ],
            },
        ],
    )
    base = tmp_path.resolve()
    assert read(path, "instruct")[1] == InstructSample(
        "c1",
        (
            Turn("system", text="be brief"),
            Turn("user", audio=str(base / "q.wav")),
            Turn("assistant", text="yes"),
            Turn("user", audio="/abs/q2.wav"),
            Turn("assistant", audio=str(base / "a2.wav")),
        ),
    )


@pytest.mark.parametrize(
    "messages, expected",
    [
        (None, "missing field 'messages'"),
        ("hi", "field 'messages' must be a list of chat turns, got string"),
        ([], "no assistant turn"),
        ([{"role": "user", "content": "q"}], "no assistant turn"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
            "messages[2] is a user turn with no assistant reply",
        ),
        ([{"role": "assistant", "content": "a"}], "messages[0].role='assistant': expected 'user'"),
        ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "messages[1].role='bot'"),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], "missing field 'messages[0].content'"),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}], "empty field 'messages[0].content'"),
        (
            [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}],
            "field 'messages[0].content' must be a string, got int",
        ),
        (["q", {"role": "assistant", "content": "a"}], "messages[0] must be an object, got string"),
        (
            [{"role": "user", "content": "q", "audio": "x.wav"}, {"role": "assistant", "content": "a"}],
            "both 'content' text and 'audio'",
        ),
        (
            [{"role": "user", "content": {"audio": ""}}, {"role": "assistant", "content": "a"}],
            "empty field 'messages[0].content.audio'",
        ),
        (
            [{"role": "user", "content": {"video": "v.mp4"}}, {"role": "assistant", "content": "a"}],
            "an object content must be",
        ),
        (
            [
                {"role": "system", "audio": "s.wav"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ],
            "system turn must be text",
        ),
    ],
)
def test_instruct_rejects(tmp_path, messages, expected):
    record = {"id": "c"} if messages is None else {"id": "c", "messages": messages}
    got = read(write(tmp_path / "chat.jsonl", [record]), "instruct")
    assert expected in reason(got[1])


def test_bad_kind_or_missing_file(tmp_path):
    path = write(tmp_path / "m.jsonl", [{"text": "x"}])
    with pytest.raises(ConfigError, match="kind='audio'"):
        list(read_manifest(path, "audio"))
    with pytest.raises(ConfigError, match="no such file"):
        list(read_manifest(tmp_path / "absent.jsonl", "text"))


def test_rejects_writer_logs_and_counts(tmp_path):
    path = write(tmp_path / "m.jsonl", [{"text": ""}, "nope", {"text": "ok"}, {"text": " "}])
    log = tmp_path / "rejects.jsonl"
    with RejectsWriter(log) as writer:
        for line, result in read_manifest(path, "text"):
            if isinstance(result, Rejected):
                writer.write(str(path), line, None, result)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["line"], r["source"], r["id"]) for r in records] == [
        (1, str(path), None),
        (2, str(path), None),
        (4, str(path), None),
    ]
    assert writer.summary()["empty field 'text'"] == 2 and writer.total == 3
