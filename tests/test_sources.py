"""The one data loader (``data.sources.load_any_dataset``): SFT data, preference pairs and prompt sets read alike."""

import json

import datasets
import pytest

import data.preference
import data.prompts
import data.sft
from data.sources import DataError, is_hub_name, load_any_dataset

ROWS = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_every_stage_uses_the_one_loader():
    assert data.sft.load_any_dataset is load_any_dataset
    assert data.preference.load_any_dataset is load_any_dataset
    assert data.prompts.load_any_dataset is load_any_dataset
    assert data.prompts.PromptDataError is DataError


@pytest.mark.parametrize("form", ["jsonl", "json", "parquet", "csv", "folder", "dict-folder"])
def test_every_form_gives_the_same_rows(tmp_path, form):
    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"data.{form}"
    if form == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    elif form == "json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif form == "parquet":
        ds.to_parquet(str(path))
    elif form == "csv":
        ds.to_csv(str(path), index=False)
    elif form == "folder":
        ds.save_to_disk(str(path))
    else:
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    assert load_any_dataset(path, cache_dir=tmp_path / "cache").to_list() == ROWS
    if form == "dict-folder":
        assert load_any_dataset(path, split="test").to_list() == ROWS[:1]


def test_missing_inputs_name_the_setting_and_the_stage_that_writes_them(tmp_path):
    with pytest.raises(DataError, match=r"^data.val: .*missing.jsonl: no such file$"):
        load_any_dataset(tmp_path / "missing.jsonl", what="data.val")
    with pytest.raises(DataError, match=r"^data.train: runs/x/sl_data/sft: no such file or folder \(.*cai sl-data"):
        load_any_dataset("runs/x/sl_data/sft", what="data.train")
    with pytest.raises(DataError, match=r"^runs/x/label/pairs: no such file or folder \(.*cai label"):
        load_any_dataset("runs/x/label/pairs", what=None)


def test_unreadable_or_empty_sources(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"^notes.txt: unsupported file type; expected a datasets folder or one of"):
        load_any_dataset(tmp_path / "notes.txt")
    datasets.Dataset.from_list(ROWS).select([]).save_to_disk(str(tmp_path / "zero_rows"))
    with pytest.raises(DataError, match="zero_rows: no rows"):
        load_any_dataset(tmp_path / "zero_rows")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"^bad.jsonl: line 2: invalid JSON"):
        load_any_dataset(tmp_path / "bad.jsonl")


@pytest.mark.parametrize(
    "name,hub",
    [
        ("owner/name", True),
        ("Anthropic/hh-rlhf/red-team-attempts", True),
        ("owner/name.v2", True),
        ("red_team", False),  # one part: a built-in name or a missing file
        ("runs/tiny/sl_data/sft", False),  # a run folder not written yet
        ("./owner/name", False),
        ("/abs/path", False),
        ("owner/file.jsonl", False),  # a data file's suffix
    ],
)
def test_hub_names(name, hub):
    assert is_hub_name(name) is hub


def test_hub_dataset_gets_split_and_data_dir(monkeypatch):
    seen = {}

    def fake_load_dataset(repo, data_dir=None, split=None, cache_dir=None):
        seen.update(repo=repo, data_dir=data_dir, split=split)
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_any_dataset("owner/name/sub", split="test").to_list() == ROWS
    assert seen == {"repo": "owner/name", "data_dir": "sub", "split": "test"}


def test_hub_failure_is_one_line_naming_the_setting():
    with pytest.raises(DataError, match=r"^data.train: owner/missing-set: cannot load hub dataset") as err:
        load_any_dataset("owner/missing-set", what="data.train")
    assert "\n" not in str(err.value)
