import json
import logging

import datasets
import pytest

from data.prompts import (
    BUILTIN_SETS,
    PromptDataError,
    first_human_turn,
    first_user_message,
    load_prompts,
    load_prompts_with_stats,
    mix_prompts,
)

ROWS = [{"id": "a", "prompt": "What is 2 + 2?"}, {"id": "b", "prompt": "Name a colour."}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def load(tmp_path):
    """load_prompts_with_stats with the datasets cache inside tmp_path."""

    def _load(source, **kwargs):
        return load_prompts_with_stats(source, cache_dir=tmp_path / "hf-cache", **kwargs)

    return _load


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def one_line_error(err) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ValueError)
    return message


# -------------------------------------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize("name,prefix", [("red_team", "rt-"), ("helpful", "hp-")])
def test_builtin_sets(load, name, prefix):
    ds, stats = load(name, keep_columns=["category"])
    assert ds.column_names == ["id", "prompt", "source", "category"]
    assert len(ds) >= 64 and stats.kept == stats.total == len(ds)
    assert len(set(ds["id"])) == len(ds) and all(i.startswith(prefix) for i in ds["id"])
    assert all(p.strip() == p and p for p in ds["prompt"]) and len(set(ds["prompt"])) == len(ds)
    assert set(ds["source"]) == {name} and all(ds["category"])
    assert len(set(ds["category"])) >= 10


def test_builtin_sets_are_disjoint(load):
    red, helpful = (set(load(name)[0]["prompt"]) for name in BUILTIN_SETS)
    assert not red & helpful


# ---------------------------------------------------------------------------------------------------- input forms


def _write(kind, tmp_path):
    if kind == "jsonl":
        return write_jsonl(tmp_path / "p.jsonl", ROWS)
    if kind == "json":
        (tmp_path / "p.json").write_text(json.dumps(ROWS))
        return tmp_path / "p.json"
    table = datasets.Dataset.from_list(ROWS)
    if kind == "parquet":
        table.to_parquet(str(tmp_path / "p.parquet"))
        return tmp_path / "p.parquet"
    if kind == "csv":
        table.to_csv(str(tmp_path / "p.csv"), index=False)
        return tmp_path / "p.csv"
    if kind == "disk":
        table.save_to_disk(str(tmp_path / "p"))
        return tmp_path / "p"
    datasets.DatasetDict({"train": table.select([0]), "test": table}).save_to_disk(str(tmp_path / "p"))
    return tmp_path / "p"


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "disk", "disk-dict"])
def test_file_forms(load, tmp_path, kind):
    path = _write(kind, tmp_path)
    ds, _ = load(str(path), split="test") if kind == "disk-dict" else load(path)
    assert ds.to_list() == [r | {"source": path.name} for r in ROWS]
    assert ds.features["id"].dtype == "string"


def test_messages_column(load, tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": " Hi there "}]},
        {"messages": [{"role": "user", "content": "Second"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "system", "content": "No user turn."}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    for kwargs in ({}, {"format": "messages"}, {"prompt_column": "messages"}):
        ds, stats = load(path, **kwargs)
        assert ds["prompt"] == [" Hi there ", "Second"] and ds["id"] == ["chat-000000", "chat-000001"]
        assert stats.skipped_empty == 1


def test_hh_transcripts_in_chosen_column(load, tmp_path):
    chosen = "\n\nHuman: How do I boil rice?\n\nAssistant: Rinse it first.\n\nHuman: Then?\n\nAssistant: Simmer."
    rows = [{"chosen": chosen, "rejected": chosen.replace("Simmer.", "Burn it.")}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    for kwargs in ({}, {"format": "hh"}, {"prompt_column": "chosen"}):
        ds, _ = load(path, **kwargs)
        assert ds.to_list() == [{"id": "hh-000000", "prompt": "How do I boil rice?", "source": "hh.jsonl"}]


def test_hh_prompt_column_is_detected(load, tmp_path):
    path = write_jsonl(tmp_path / "red.jsonl", [{"prompt": "\n\nHuman: Tell me a secret.\n\nAssistant:"}])
    assert load(path)[0]["prompt"] == ["Tell me a secret."]
    assert load(path, format="text")[0]["prompt"] == ["\n\nHuman: Tell me a secret.\n\nAssistant:"]


def test_custom_columns(load, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"qid": 7, "question": "Why?", "topic": "x"}])
    ds, _ = load(path, prompt_column="question", id_column="qid", keep_columns=["topic"])
    assert ds.to_list() == [{"id": "7", "prompt": "Why?", "source": "q.jsonl", "topic": "x"}]


def test_turn_helpers():
    assert first_human_turn("Human: a\n\nAssistant: b") == "a"
    assert first_human_turn("\n\nHuman: only a question") == "only a question"
    with pytest.raises(ValueError):
        first_human_turn("no turns here")
    parts = [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"}]}]
    assert first_user_message(parts) == "look"
    assert first_user_message([{"role": "assistant", "content": "x"}]) == ""


# --------------------------------------------------------------------------------------------- skipping and limits


def test_empty_and_long_prompts_are_skipped_and_counted(load, tmp_path, caplog):
    rows = [
        {"prompt": "ok"},
        {"prompt": ""},
        {"prompt": "   "},
        {"prompt": None},
        {"prompt": "x" * 50},
        {"prompt": "y"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ds, stats = load(path, max_chars=10)
    assert ds["prompt"] == ["ok", "y"] and ds["id"] == ["mixed-000000", "mixed-000005"]  # ids keep the row number
    assert (stats.total, stats.kept, stats.skipped_empty, stats.skipped_too_long) == (6, 2, 3, 1)
    with caplog.at_level(logging.WARNING, logger="data.prompts"):
        assert len(load_prompts(path, max_chars=10, cache_dir=tmp_path / "hf-cache")) == 2
    assert "skipped 3 empty and 1 over-long" in caplog.text


def test_max_prompts(load, tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(10)])
    ds, stats = load(path, max_prompts=4)
    assert ds["id"] == ["p0", "p1", "p2", "p3"] and (stats.kept, stats.not_read) == (4, 6)


def test_all_empty_gives_typed_empty_dataset(load, tmp_path):
    ds, stats = load(write_jsonl(tmp_path / "e.jsonl", [{"prompt": " "}]))
    assert len(ds) == 0 and stats.skipped_empty == 1 and ds.features["prompt"].dtype == "string"


# ---------------------------------------------------------------------------------------------------------- errors


def test_missing_file(load, tmp_path):
    with pytest.raises(PromptDataError) as err:
        load(tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in one_line_error(err)


def test_unknown_builtin_lists_names(load):
    with pytest.raises(PromptDataError) as err:
        load("red-team")
    assert "unknown built-in prompt set 'red-team'; built-in sets: red_team, helpful" in one_line_error(err)


def test_missing_column_lists_columns(load, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "text": "hi"}])
    with pytest.raises(PromptDataError) as err:
        load(path, prompt_column="question")
    assert one_line_error(err) == "prompts.jsonl: no column 'question'; columns are: id, text"
    with pytest.raises(PromptDataError, match="no column 'prompt'; columns are: id, text"):
        load(path)
    with pytest.raises(PromptDataError, match="no column 'topic'"):
        load(path, prompt_column="text", keep_columns=["topic"])


@pytest.mark.parametrize(
    "name,text,expected",
    [
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n', "bad.jsonl: line 3: invalid JSON"),
        ("bad.jsonl", '{"prompt": "a"}\n\n[1, 2]\n', "bad.jsonl: line 3: expected a JSON object, got list"),
        ("bad.json", '[\n  {"prompt": "a"},\n  {"prompt": "b"\n]\n', "bad.json: line 4: invalid JSON"),
    ],
)
def test_malformed_json_names_the_line(load, tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    with pytest.raises(PromptDataError) as err:
        load(tmp_path / name)
    assert one_line_error(err).startswith(expected)
    assert err.value.__cause__ is None


def test_duplicate_ids(load, tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "prompt": "a"}, {"id": "y", "prompt": "b"}] * 2)
    with pytest.raises(PromptDataError) as err:
        load(path)
    assert one_line_error(err) == "dup.jsonl: duplicate id 'x' (rows 1 and 3)"


def test_other_errors(load, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS + [{"id": None, "prompt": "c"}])
    with pytest.raises(PromptDataError, match="p.jsonl: row 3: empty id"):
        load(path)
    with pytest.raises(PromptDataError, match="unknown prompt format 'chat'"):
        load(path, format="chat")
    with pytest.raises(PromptDataError, match="row 1: expected a list of messages"):
        load(path, format="messages", id_column="none")
    (tmp_path / "p.txt").write_text("hi")
    with pytest.raises(PromptDataError, match="unsupported file type"):
        load(tmp_path / "p.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(PromptDataError, match="not a dataset directory"):
        load(tmp_path / "empty_dir")
    with pytest.raises(PromptDataError, match="no split 'validation'; splits are: train, test"):
        load(_write("disk-dict", tmp_path), split="validation")


# -------------------------------------------------------------------------------------------------------------- mix


def _prompts(prefix, n):
    return datasets.Dataset.from_dict(
        {
            "id": [f"{prefix}-{i}" for i in range(n)],
            "prompt": [f"{prefix} {i}" for i in range(n)],
            "source": [prefix] * n,
        }
    )


@pytest.mark.parametrize(
    "ratio,n_red,n_helpful",
    [(0.25, 64, 21), (0.5, 64, 64), (0.0, 64, 0), (0.75, 21, 64), (0.2, 64, 16)],
)
def test_mix_counts(ratio, n_red, n_helpful):
    mixed = mix_prompts(_prompts("rt", 64), _prompts("hp", 64), ratio, seed=0)
    assert mixed.column_names == ["id", "prompt", "source", "kind"]
    assert mixed["kind"].count("red_team") == n_red and mixed["kind"].count("helpful") == n_helpful
    assert all(i.startswith("rt" if k == "red_team" else "hp") for i, k in zip(mixed["id"], mixed["kind"]))
    assert len(set(mixed["id"])) == len(mixed)


def test_mix_is_seeded_and_shuffled(load):
    red, helpful = load("red_team")[0], load("helpful")[0]
    a, b = mix_prompts(red, helpful, 0.25, seed=3), mix_prompts(red, helpful, 0.25, seed=3)
    assert a.to_list() == b.to_list()
    assert a["id"] != mix_prompts(red, helpful, 0.25, seed=4)["id"]
    assert a["kind"][: len(red)] != ["red_team"] * len(red)  # interleaved, not concatenated
    assert a["kind"].count("helpful") == round(len(red) / 3)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_mix_rejects_bad_ratio(ratio):
    with pytest.raises(PromptDataError, match=r"helpful_ratio must be in \[0, 1\)"):
        mix_prompts(_prompts("rt", 4), _prompts("hp", 4), ratio)


def test_mix_rejects_shared_ids_and_missing_columns():
    with pytest.raises(PromptDataError, match="id 'rt-0' occurs in more than one prompt"):
        mix_prompts(_prompts("rt", 4), _prompts("rt", 4), 0.5)
    with pytest.raises(PromptDataError, match="helpful has no column 'prompt'"):
        mix_prompts(_prompts("rt", 4), _prompts("hp", 4).remove_columns("prompt"), 0.5)


def test_hub_dataset_names(monkeypatch):
    import data.prompts as prompts_mod

    seen = {}

    def fake_load_dataset(repo, data_dir=None, split=None, cache_dir=None):
        seen.update(repo=repo, data_dir=data_dir, split=split)
        return datasets.Dataset.from_list([{"transcript": "\n\nHuman: Is it safe?\n\nAssistant: Yes."}])

    monkeypatch.setattr(prompts_mod.datasets, "load_dataset", fake_load_dataset)
    ds = prompts_mod.load_prompts("Anthropic/hh-rlhf/red-team-attempts", prompt_column="transcript")
    assert seen == {"repo": "Anthropic/hh-rlhf", "data_dir": "red-team-attempts", "split": "train"}
    assert ds["prompt"] == ["Is it safe?"]


def test_hub_dataset_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptDataError, match=r"^owner/missing-set: cannot load hub dataset") as err:
        load_prompts("owner/missing-set")
    assert "\n" not in str(err.value)
