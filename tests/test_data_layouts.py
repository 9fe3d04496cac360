"""TRL preference layouts beyond the four basic ones: conversations with an implicit prompt,
tool turns, and folders of shards; each loads like its explicit single-file equivalent, and a bad
row is still one line naming the file (or shard), the row and the field."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpo_bench.data import (
    DataValidationError, HubOptions, check_data, check_lengths, load_preferences, local_source_exists, render_conversational,
)
from pipelines.cli import main

SYSTEM = {"role": "system", "content": "be brief"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


TOOL_CALL = {"role": "assistant", "tool_calls": [
    {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
TOOL_RESULT = {"role": "tool", "name": "weather", "content": "sunny"}

# The explicit-prompt rows, and the same conversations with the prompt left implicit.
EXPLICIT = [
    {"prompt": [SYSTEM, user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("bye")]},
    {"prompt": [user("hi"), assistant("hello"), user("and now?")], "chosen": [assistant("now hello")],
     "rejected": [assistant("bye"), user("why?"), assistant("just so")]},
    {"prompt": [user("weather in Paris?")], "chosen": [TOOL_CALL, TOOL_RESULT, assistant("sunny")],
     "rejected": [assistant("no idea")]},
]
IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in EXPLICIT]

# Renders every role and a tool call's function name, as tool-aware templates do.
TOOL_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> "
    "{% if m.tool_calls %}call {{ m.tool_calls[0].function.name }}{% endif %}{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer(template=TOOL_TEMPLATE):
    words = ["[UNK]", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "hi", "hello", "bye", "call", "weather"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=template)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --------------------------------------------------------------- conversations, implicit prompt


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
def test_an_implicit_prompt_conversation_loads_as_its_explicit_prompt_equivalent(tmp_path, write):
    suffix = ".jsonl" if write is write_jsonl else ".parquet"
    implicit = load_preferences(write(tmp_path / f"implicit{suffix}", IMPLICIT))
    explicit = load_preferences(write_jsonl(tmp_path / "explicit.jsonl", EXPLICIT))
    assert (implicit.format, explicit.format) == ("implicit_conversational", "conversational")
    assert implicit.frame.iloc[1].tolist() == [EXPLICIT[1][c] for c in ("prompt", "chosen", "rejected")]
    pd.testing.assert_frame_equal(implicit.frame, explicit.frame)
    assert implicit.fingerprint == explicit.fingerprint

    report = check_data(tmp_path / f"implicit{suffix}")
    assert report.splitlines()[:3] == [f"ok: {tmp_path / f'implicit{suffix}'}", "  format: implicit_conversational",
                                       "  rows: 3 valid, 0 bad, 3 read"]
    assert f"fingerprint: {explicit.fingerprint}" in report


def test_implicit_prompt_conversations_render_and_count_like_explicit_ones(tmp_path):
    implicit = load_preferences(write_jsonl(tmp_path / "i.jsonl", IMPLICIT))
    explicit = load_preferences(write_jsonl(tmp_path / "e.jsonl", EXPLICIT))
    rendered = render_conversational(implicit, tokenizer())
    pd.testing.assert_frame_equal(rendered, render_conversational(explicit, tokenizer()))
    assert rendered.iloc[0].tolist() == ["<|system|> be brief\n<|user|> hi\n<|assistant|>", " hello\n", " bye\n"]
    assert rendered.iloc[2].tolist() == [
        "<|user|> weather in Paris?\n<|assistant|>", " call weather\n<|tool|> sunny\n<|assistant|> sunny\n", " no idea\n"]
    assert check_lengths(implicit, tokenizer(), 100).fingerprint == implicit.fingerprint


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("b")]},
         "chosen", "shares no leading user turn with 'rejected', so no prompt"),
        ({"chosen": [SYSTEM, user("a"), assistant("b")], "rejected": [SYSTEM, user("c"), assistant("d")]},
         "chosen", r"shares no leading user turn with 'rejected' \(only system\)"),
        ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]},
         "rejected", "identical to 'chosen'"),
        ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b"), user("c"), assistant("d")]},
         "chosen", "has no message after the prompt"),
        ({"chosen": [user("a"), assistant("b"), user("c")], "rejected": [user("a"), assistant("b"), user("d")]},
         "chosen[2].role", "the conversations differ at a user turn"),
        ({"chosen": [user("a"), assistant("")], "rejected": [user("a"), assistant("b")]},
         "chosen[1].content", "empty string"),
    ],
)
def test_a_bad_implicit_prompt_conversation_is_one_line_naming_file_row_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "i.jsonl", [IMPLICIT[0], row])
    with pytest.raises(DataValidationError, match=problem) as info:
        load_preferences(path)
    assert (info.value.source, info.value.row, info.value.field) == (str(path), 1, field)
    assert str(info.value).startswith(f"{path}: row 1, field '{field}': ") and "\n" not in str(info.value)
    skipped = load_preferences(path, on_bad_rows="skip")
    assert (len(skipped), skipped.n_dropped) == (1, 1)


# ------------------------------------------------------------------------------------ tool turns


def test_tool_turns_load_in_both_conversational_layouts_and_keep_the_fingerprint_across_files(tmp_path):
    from_jsonl = load_preferences(write_jsonl(tmp_path / "t.jsonl", EXPLICIT))
    from_parquet = load_preferences(write_parquet(tmp_path / "t.parquet", EXPLICIT))  # structs add null keys
    assert from_parquet.frame.iloc[2]["chosen"] == [TOOL_CALL, TOOL_RESULT, assistant("sunny")]
    assert from_parquet.fingerprint == from_jsonl.fingerprint


@pytest.mark.parametrize(
    ("message", "field", "problem"),
    [
        ({"role": "robot", "content": "x"}, "chosen[1].role", "unknown role 'robot'; expected one of assistant, system, tool, user"),
        ({"role": "user", "content": "x", "tool_calls": TOOL_CALL["tool_calls"]}, "chosen[1].tool_calls",
         "only an assistant message calls tools"),
        ({"role": "assistant", "tool_calls": [{"type": "function"}]}, "chosen[1].tool_calls[0]", "expected"),
        ({"role": "tool", "name": "weather"}, "chosen[1]", "message is missing 'content'"),
    ],
)
def test_a_bad_tool_turn_names_the_message(tmp_path, message, field, problem):
    rows = [{"prompt": [user("q")], "chosen": [assistant("a"), message], "rejected": [assistant("b")]}]
    with pytest.raises(DataValidationError, match=problem) as info:
        load_preferences(write_jsonl(tmp_path / "t.jsonl", rows))
    assert (info.value.row, info.value.field) == (0, field)


# ------------------------------------------------------------------------------ folders of shards

STANDARD = [{"prompt": f"the film {i} was", "chosen": " great", "rejected": " dull"} for i in range(5)]


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
def test_a_folder_of_shards_reads_as_one_dataset_in_name_order(tmp_path, write):
    suffix = ".jsonl" if write is write_jsonl else ".parquet"
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / f"train-00001{suffix}", STANDARD[3:])  # written first, read second
    write(tmp_path / "data" / f"train-00000{suffix}", STANDARD[:3])
    single = load_preferences(write_jsonl(tmp_path / "all.jsonl", STANDARD))
    sharded = load_preferences(tmp_path / "data")
    pd.testing.assert_frame_equal(sharded.frame, single.frame)
    assert sharded.fingerprint == single.fingerprint
    assert load_preferences(tmp_path / "data", max_rows=4).frame.equals(single.frame.head(4))
    assert check_data(tmp_path / "data").splitlines()[2] == "  rows: 5 valid, 0 bad, 5 read"


def test_a_bad_row_in_a_shard_names_the_shard_and_its_own_row(tmp_path):
    write_jsonl(tmp_path / "data" / "train-00000.jsonl", STANDARD[:3])
    shard = write_jsonl(tmp_path / "data" / "train-00001.jsonl", [STANDARD[3], {**STANDARD[4], "chosen": ""}])
    with (shard.open("a")) as f:
        f.write("{broken\n")
    with pytest.raises(DataValidationError) as info:
        load_preferences(tmp_path / "data")
    assert str(info.value) == f"{shard}: row 1, field 'chosen': empty string"
    skipped = load_preferences(tmp_path / "data", on_bad_rows="skip")
    assert [(p.source, p.row, p.index) for p in skipped.problems] == [(str(shard), 1, 4), (str(shard), 2, 5)]
    # Later checks name the shard too: the third row of the second shard is the dataset's sixth.
    assert str(skipped.error(5, "chosen", "too long")) == f"{shard}: row 2, field 'chosen': too long"
    report = check_data(tmp_path / "data")
    assert f"{shard}: row 1, field 'chosen': empty string" in report and f"{shard}: row 2: not valid JSON" in report


def test_a_folder_reads_one_split_of_its_shards(tmp_path):
    write_jsonl(tmp_path / "data" / "train-00000.jsonl", STANDARD[:3])
    write_jsonl(tmp_path / "data" / "test-00000.jsonl", STANDARD[3:])
    assert load_preferences(tmp_path / "data").frame["prompt"].tolist() == [r["prompt"] for r in STANDARD[:3]]
    assert len(load_preferences(tmp_path / "data", split="test")) == 2
    with pytest.raises(DataValidationError, match="no shards of split 'dev'; the shards' splits: test, train"):
        load_preferences(tmp_path / "data", split="dev")


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({}, "folder is neither a save_to_disk directory .* nor a folder of .jsonl, .json, .parquet, .csv shards$"),
        ({"a.jsonl": STANDARD, "b.parquet": STANDARD}, r"folder mixes shard types \(.jsonl, .parquet\)"),
        ({"a.jsonl": STANDARD, "b.arrow": None}, "folder of shards also holds b.arrow"),
        ({"sub/a.jsonl": STANDARD}, "it holds the folders sub/: name the one with the data"),
    ],
)
def test_a_folder_that_is_not_one_dataset_is_refused_clearly(tmp_path, files, problem):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, rows in files.items():
        path = folder / name
        path.parent.mkdir(exist_ok=True)
        if rows is None:
            path.write_bytes(b"\x00")
        else:
            (write_parquet if name.endswith(".parquet") else write_jsonl)(path, rows)
    with pytest.raises(DataValidationError, match=problem) as info:
        load_preferences(folder)
    assert (info.value.source, info.value.row) == (str(folder), None)


def test_a_save_to_disk_folder_is_still_read_as_a_saved_dataset(tmp_path):
    datasets.Dataset.from_list(STANDARD).save_to_disk(str(tmp_path / "saved"))
    assert load_preferences(tmp_path / "saved").fingerprint == load_preferences(write_jsonl(tmp_path / "a.jsonl", STANDARD)).fingerprint


# ---------------------------------------------------------------------------------- globs


def test_a_glob_reads_its_files_as_one_dataset_in_name_order(tmp_path):
    write_jsonl(tmp_path / "data" / "train-00001.jsonl", STANDARD[3:])
    write_jsonl(tmp_path / "data" / "train-00000.jsonl", STANDARD[:3])
    write_jsonl(tmp_path / "data" / "test-00000.jsonl", [{**STANDARD[0], "prompt": "not this"}])
    single = load_preferences(write_jsonl(tmp_path / "all.jsonl", STANDARD))
    pattern = str(tmp_path / "data" / "train-*.jsonl")
    globbed = load_preferences(pattern)
    pd.testing.assert_frame_equal(globbed.frame, single.frame)
    assert globbed.fingerprint == single.fingerprint
    assert load_preferences(str(tmp_path / "**" / "train-*.jsonl")).fingerprint == single.fingerprint  # ** spans folders
    assert load_preferences(pattern, max_rows=4).frame.equals(single.frame.head(4))
    assert local_source_exists(pattern) and not local_source_exists(str(tmp_path / "data" / "dev-*.jsonl"))


def test_a_glob_names_the_file_and_its_own_row_and_refuses_what_it_cannot_read(tmp_path):
    write_jsonl(tmp_path / "data" / "a.jsonl", STANDARD[:3])
    bad = write_jsonl(tmp_path / "data" / "b.jsonl", [{**STANDARD[3], "rejected": ""}])
    with pytest.raises(DataValidationError) as info:
        load_preferences(str(tmp_path / "data" / "*.jsonl"))
    assert str(info.value) == f"{bad}: row 0, field 'rejected': empty string"
    with pytest.raises(FileNotFoundError, match=r"no file matches .*\*\.csv"):
        load_preferences(str(tmp_path / "data" / "*.csv"))
    write_parquet(tmp_path / "data" / "c.parquet", STANDARD)
    with pytest.raises(DataValidationError, match=r"the pattern mixes shard types \(.jsonl, .parquet\)"):
        load_preferences(str(tmp_path / "data" / "*"))


# ---------------------------------------------------------------------------- hub datasets

HUB_ROWS = {"small": [{"prompt": f"small {i}", "chosen": " yes", "rejected": " no"} for i in range(3)],
            "big": [{"prompt": f"big {i}", "chosen": " yes", "rejected": " no"} for i in range(6)]}


@pytest.fixture
def hub_repo(tmp_path, monkeypatch):
    """A dataset repository laid out as on the hub (configurations in its README's YAML, the big one
    in two files), served for the id 'someone/prefs' by the real ``datasets.load_dataset``; the calls'
    options are recorded."""
    repo = tmp_path / "repo"
    write_jsonl(repo / "small" / "train.jsonl", HUB_ROWS["small"])
    write_jsonl(repo / "big" / "train-0.jsonl", HUB_ROWS["big"][:4])
    write_jsonl(repo / "big" / "train-1.jsonl", HUB_ROWS["big"][4:])
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: small/train.jsonl\n  default: true\n"
        "- config_name: big\n  data_files:\n  - split: train\n    path: big/*.jsonl\n---\n", encoding="utf-8")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    real, calls = datasets.load_dataset, []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        assert path == "someone/prefs"
        return real(str(repo), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def prompts(data):
    return data.frame["prompt"].tolist()


def test_a_hub_dataset_is_read_in_the_configuration_and_files_asked_for(hub_repo):
    assert prompts(load_preferences("someone/prefs")) == [r["prompt"] for r in HUB_ROWS["small"]]
    assert prompts(load_preferences("someone/prefs", hub=HubOptions(name="big"))) == [r["prompt"] for r in HUB_ROWS["big"]]
    only = HubOptions(data_files=("big/train-1.jsonl",))
    assert prompts(load_preferences("someone/prefs", hub=only)) == [r["prompt"] for r in HUB_ROWS["big"][4:]]
    assert hub_repo[1] == ("someone/prefs", {"split": "train", "name": "big"})
    assert hub_repo[2] == ("someone/prefs", {"split": "train", "data_files": ["big/train-1.jsonl"]})


def test_the_first_rows_of_a_hub_dataset_are_streamed_not_downloaded_whole(hub_repo):
    whole = load_preferences("someone/prefs", hub=HubOptions(name="big"))
    first = load_preferences("someone/prefs", hub=HubOptions(name="big"), max_rows=5)
    assert hub_repo[-1] == ("someone/prefs", {"split": "train", "streaming": True, "name": "big"})
    pd.testing.assert_frame_equal(first.frame, whole.frame.head(5))


def test_a_configuration_the_hub_dataset_lacks_is_one_line(hub_repo, capsys):
    with pytest.raises(DataValidationError) as info:
        load_preferences("someone/prefs", hub=HubOptions(name="huge", revision="v2"))
    message = str(info.value)
    assert message.startswith("someone/prefs (configuration huge; revision v2): ") and "\n" not in message
    assert "huge" in message.split(": ", 1)[1]
    assert main(["check-data", "someone/prefs", "--data-config", "big", "--max-rows", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: someone/prefs") and "rows: 2 valid, 0 bad, 2 read" in out
    assert hub_repo[-1] == ("someone/prefs", {"split": "train", "streaming": True, "name": "big"})


# ------------------------------------------------------------------------------------------- CLI


def test_check_data_on_each_layout_prints_no_traceback(tmp_path, capsys):
    write_jsonl(tmp_path / "data" / "train-00000.jsonl", IMPLICIT[:2])
    write_jsonl(tmp_path / "data" / "train-00001.jsonl", IMPLICIT[2:])
    assert main(["check-data", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "format: implicit_conversational" in out and "rows: 3 valid, 0 bad, 3 read" in out
    bad = write_jsonl(tmp_path / "bad" / "train-00000.jsonl", [IMPLICIT[0], {"chosen": [user("a")], "rejected": [user("b")]}])
    assert main(["check-data", str(tmp_path / "bad")]) == 1
    captured = capsys.readouterr()
    assert f"{bad}: row 1, field 'chosen': shares no leading user turn" in captured.out
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl", STANDARD)
    write_jsonl(tmp_path / "mixed" / "b.csv", STANDARD)
    assert main(["check-data", str(tmp_path / "mixed")]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("unusable:") and "folder mixes shard types" in captured.out
    assert "Traceback" not in captured.out + captured.err
