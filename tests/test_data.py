"""Preference data: round trips, fingerprints, the four formats, rendering and atomic writes."""

from __future__ import annotations

import csv
import json
import pickle

import datasets
import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dpo_bench import data as data_module
from dpo_bench.data import (
    DataValidationError,
    HubUnreachableError,
    PreferenceData,
    check_data,
    check_lengths,
    detect_format,
    fingerprint_frame,
    load_preferences,
    rankings_to_pairs,
    render_conversational,
    validate_frame,
    write_preferences,
)

ROWS = [
    {"prompt": "the film was", "chosen": " great fun", "rejected": " dull"},
    {"prompt": "the plot is", "chosen": " clever, ‘witty’ — 日本", "rejected": " thin"},
    {"prompt": "the cast", "chosen": " shines", "rejected": " mumbles\nbadly"},
]
COLUMNS = ["prompt", "chosen", "rejected"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_tokenizer(template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline, with a small chat template."""
    words = ["[UNK]", "<|system|>", "<|user|>", "<|assistant|>", "be", "brief", "hi", "hello", "bye"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=template)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def expected_frame(rows, columns=COLUMNS):
    return pd.DataFrame({c: [r[c] for r in rows] for c in columns})


def plain(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.reset_index(drop=True)


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_write_then_load_round_trips(tmp_path, suffix):
    frame = expected_frame(ROWS)
    fingerprint = write_preferences(frame, tmp_path / f"prefs{suffix}")
    loaded = load_preferences(tmp_path / f"prefs{suffix}")
    pd.testing.assert_frame_equal(plain(loaded.frame), frame)
    assert loaded.fingerprint == fingerprint == fingerprint_frame(frame)
    assert (loaded.format, len(loaded), loaded.n_dropped, loaded.problems) == ("standard", 3, 0, ())


def test_same_rows_same_fingerprint_in_every_format(tmp_path):
    jsonl = load_preferences(write_jsonl(tmp_path / "p.jsonl", ROWS))
    write_preferences(jsonl.frame, tmp_path / "p.parquet")
    with open(tmp_path / "p.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(ROWS)
    (tmp_path / "p.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved_dict"))

    others = [
        load_preferences(tmp_path / "p.parquet"),
        load_preferences(tmp_path / "p.csv"),
        load_preferences(tmp_path / "p.json"),
        load_preferences(tmp_path / "saved"),
        load_preferences(tmp_path / "saved_dict", split="test"),
    ]
    for other in others:
        pd.testing.assert_frame_equal(other.frame, jsonl.frame)
        assert other.fingerprint == jsonl.fingerprint


def test_saved_dataset_dict_names_a_missing_split(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataValidationError, match="split 'train' not found; available: test"):
        load_preferences(tmp_path / "d")


def test_conversational_round_trip_keeps_the_fingerprint(tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "bye"}],
        }
    ]
    from_jsonl = load_preferences(write_jsonl(tmp_path / "c.jsonl", rows))
    write_preferences(from_jsonl, tmp_path / "c.parquet")
    from_parquet = load_preferences(tmp_path / "c.parquet")
    assert from_jsonl.format == from_parquet.format == "conversational"
    assert from_parquet.frame.iloc[0].tolist() == [rows[0][c] for c in COLUMNS]
    assert from_parquet.fingerprint == from_jsonl.fingerprint


def test_max_rows_reads_only_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [*ROWS, {"prompt": "broken"}])
    loaded = load_preferences(path, max_rows=2)
    pd.testing.assert_frame_equal(plain(loaded.frame), expected_frame(ROWS[:2]))


# ------------------------------------------------------------------------------ fingerprints


def test_fingerprint_changes_with_one_character_order_and_column_names():
    frame = expected_frame(ROWS)
    base = fingerprint_frame(frame)
    assert len(base) == 64 and int(base, 16) >= 0
    one_char = frame.copy()
    one_char.loc[1, "rejected"] = " thim"
    assert fingerprint_frame(one_char) != base
    assert fingerprint_frame(frame.iloc[::-1]) != base
    assert fingerprint_frame(frame.rename(columns={"prompt": "query"})) != base
    assert fingerprint_frame(frame[["chosen", "prompt", "rejected"]]) != base
    # The index is not content: the same rows under other labels fingerprint the same.
    assert fingerprint_frame(frame.set_axis([10, 11, 12])) == base


# ------------------------------------------------------------------------------ formats


def test_column_map_renames_stack_exchange_columns(tmp_path):
    rows = [
        {"qid": 1, "question": "How do I sort?", "response_j": " Use sorted().", "response_k": " You can't."},
        {"qid": 2, "question": "What is a tuple?", "response_j": " An immutable list.", "response_k": " A list."},
    ]
    loaded = load_preferences(
        write_jsonl(tmp_path / "se.jsonl", rows),
        column_map={"question": "prompt", "response_j": "chosen", "response_k": "rejected"},
    )
    expected = pd.DataFrame(
        {
            "prompt": ["How do I sort?", "What is a tuple?"],
            "chosen": [" Use sorted().", " An immutable list."],
            "rejected": [" You can't.", " A list."],
        }
    )
    pd.testing.assert_frame_equal(plain(loaded.frame), expected)  # extra columns are not kept


def test_column_map_naming_an_absent_column_is_an_error(tmp_path):
    with pytest.raises(DataValidationError, match="column 'question' is named in column_map"):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", ROWS), column_map={"question": "prompt"})


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ("The film was great", "The film was awful", ("The film was", " great", " awful")),
        ("The film is good", "The film is great", ("The film is", " good", " great")),
        ("Q: hi\nA: yes", "Q: hi\nA: no", ("Q: hi\nA:", " yes", " no")),
        ("one two", "one two three", ("one", " two", " two three")),
        ("Say  it   loud", "Say  it   softly", ("Say  it", "   loud", "   softly")),
    ],
)
def test_implicit_prompt_is_the_common_prefix_at_a_word_boundary(tmp_path, chosen, rejected, expected):
    loaded = load_preferences(write_jsonl(tmp_path / "i.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    assert loaded.format == "implicit"
    assert loaded.frame.iloc[0].tolist() == list(expected)
    assert expected[0] + expected[1] == chosen and expected[0] + expected[2] == rejected


def test_implicit_without_common_prefix_names_the_row(tmp_path):
    rows = [{"chosen": "a b c", "rejected": "a b d"}, {"chosen": "yes please", "rejected": "no thanks"}]
    with pytest.raises(DataValidationError) as info:
        load_preferences(write_jsonl(tmp_path / "i.jsonl", rows))
    assert (info.value.row, info.value.field) == (1, "chosen")


def test_a_misspelled_prompt_is_not_silently_replaced_by_an_implicit_prompt(tmp_path):
    rows = [{"promt": "a", "chosen": "a b", "rejected": "a c"}]
    with pytest.raises(DataValidationError, match="column 'prompt' is missing .*found 'promt'"):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))


RANKED = pd.DataFrame({"prompt": ["p0", "p1"], "ranking": [["a", "b", "c"], ["x", "y", "z"]]})


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("all_pairs", [("p0", "a", "b"), ("p0", "a", "c"), ("p0", "b", "c"), ("p1", "x", "y"), ("p1", "x", "z"), ("p1", "y", "z")]),
        ("best_vs_worst", [("p0", "a", "c"), ("p1", "x", "z")]),
        ("adjacent", [("p0", "a", "b"), ("p0", "b", "c"), ("p1", "x", "y"), ("p1", "y", "z")]),
    ],
)
def test_rankings_to_pairs_k3(mode, expected):
    pairs = rankings_to_pairs(RANKED, mode)
    assert list(pairs.columns) == COLUMNS
    assert [tuple(r) for r in pairs.itertuples(index=False)] == expected
    assert list(pairs.index) == [int(p[0][1]) for p in expected]  # each pair's source row


def test_rankings_load_and_pairs(tmp_path):
    rows = [{"prompt": "p0", "ranking": ["a", "b", "c"]}, {"prompt": "p1", "ranking": ["x", "y"]}]
    loaded = load_preferences(write_jsonl(tmp_path / "r.jsonl", rows))
    assert loaded.format == "rankings"
    assert [tuple(r) for r in loaded.pairs("best_vs_worst").itertuples(index=False)] == [("p0", "a", "c"), ("p1", "x", "y")]
    assert len(loaded.pairs()) == 4
    with pytest.raises(ValueError, match="mode must be one of"):
        loaded.pairs("random")


CONVERSATION = {
    "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    "chosen": [{"role": "assistant", "content": "hello"}],
    "rejected": [{"role": "assistant", "content": "bye"}],
}


def test_render_conversational_with_a_chat_template(tmp_path):
    loaded = load_preferences(write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]))
    rendered = render_conversational(loaded, chat_tokenizer())
    assert rendered.iloc[0].tolist() == [
        "<|system|> be brief\n<|user|> hi\n<|assistant|>",
        " hello\n",
        " bye\n",
    ]


def test_render_conversational_rejects_a_template_that_breaks_the_prefix(tmp_path):
    loaded = load_preferences(write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]))
    odd = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "ASSISTANT:{% endif %}")
    with pytest.raises(DataValidationError) as info:
        render_conversational(loaded, chat_tokenizer(odd))
    assert (info.value.row, info.value.field) == (0, "chosen")


def test_check_lengths_counts_prompt_plus_completion(tmp_path):
    rows = [
        {"prompt": "hi hi", "chosen": " hello", "rejected": " bye"},
        {"prompt": "hi", "chosen": " hello hello hello", "rejected": " bye"},
    ]
    loaded = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    tokenizer = chat_tokenizer()
    assert check_lengths(loaded, tokenizer, 4) is loaded
    with pytest.raises(DataValidationError, match=r"row 1, field 'chosen': prompt \+ completion is 4 tokens"):
        check_lengths(loaded, tokenizer, 3)
    kept = check_lengths(loaded, tokenizer, 3, on_bad_rows="skip")
    assert (len(kept), kept.n_dropped, [p.row for p in kept.problems]) == (1, 1, [1])
    assert kept.fingerprint == fingerprint_frame(kept.frame) != loaded.fingerprint


def test_check_lengths_renders_conversations_first(tmp_path):
    loaded = load_preferences(write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]))
    # prompt: "<|system|> be brief <|user|> hi <|assistant|>" = 6 words; chosen: 1 word
    assert len(check_lengths(loaded, chat_tokenizer(), 7)) == 1
    with pytest.raises(DataValidationError, match="field 'chosen'"):
        check_lengths(loaded, chat_tokenizer(), 6)


def test_detect_format_by_majority_of_chosen_values():
    strings = pd.DataFrame({"prompt": ["a", "b", "c"], "chosen": ["x", ["y"], "z"], "rejected": ["1", "2", "3"]})
    assert detect_format(strings) == "standard"
    with pytest.raises(DataValidationError) as info:
        validate_frame(strings)
    assert (info.value.row, info.value.field) == (1, "chosen")
    assert detect_format(pd.DataFrame({"prompt": ["p"], "ranking": [["a", "b"]]})) == "rankings"


def test_validate_frame_skip_returns_clean_frame_and_problems():
    frame = pd.DataFrame({"prompt": ["a", "b", "c"], "chosen": ["x", None, "z"], "rejected": ["y", "w", "z"]})
    clean, problems = validate_frame(frame, "mem", on_bad_rows="skip")
    assert clean.index.tolist() == [0]
    assert [str(p) for p in problems] == [
        "mem: row 1, field 'chosen': missing value (NaN)",  # pandas stores None as NaN in str columns
        "mem: row 2, field 'rejected': identical to 'chosen'",
    ]


# ------------------------------------------------------------------------------ sources


def test_missing_path_raises_file_not_found(tmp_path):
    for missing in [tmp_path / "nope.jsonl", "./nope.jsonl", "data/dir/nope", "nope.parquet"]:
        with pytest.raises(FileNotFoundError, match="nope"):
            load_preferences(missing)


def test_hub_ids_go_to_load_dataset_without_remote_code(monkeypatch):
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_preferences("someone/prefs", split="test")
    assert calls == [("someone/prefs", {"split": "test"})]
    assert loaded.fingerprint == fingerprint_frame(expected_frame(ROWS))
    load_preferences("someone/prefs", trust_remote_code=True)
    assert calls[-1] == ("someone/prefs", {"split": "train", "trust_remote_code": True})


def test_an_unreachable_hub_is_one_error_naming_the_dataset_and_what_to_do(monkeypatch):
    def no_network(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (ConnectError)")  # as datasets words it

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubUnreachableError) as caught:
        load_preferences("someone/prefs")
    assert str(caught.value).startswith("someone/prefs: could not reach the Hugging Face hub to read this dataset; ")
    assert "HF_HUB_OFFLINE=1" in str(caught.value) and isinstance(caught.value, ConnectionError)
    copy = pickle.loads(pickle.dumps(caught.value))  # it may cross from a worker process
    assert (copy.source, str(copy)) == ("someone/prefs", str(caught.value))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError, match=r"\(HF_HUB_OFFLINE is set and it is not in the cache\)"):
        load_preferences("someone/prefs")


def test_a_csv_field_beyond_the_csv_modules_default_limit_reads(tmp_path):
    rows = [dict(ROWS[0], chosen=" great" * 30_000)]  # 180 KB > csv's default 128 KiB
    with open(tmp_path / "big.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    limit = csv.field_size_limit()
    assert load_preferences(tmp_path / "big.csv").fingerprint == fingerprint_frame(expected_frame(rows))
    assert csv.field_size_limit() == limit


def test_unsupported_suffix_is_named(tmp_path):
    (tmp_path / "prefs.pkl").write_bytes(pickle.dumps(ROWS))
    with pytest.raises(DataValidationError, match=r"unsupported file type '\.pkl'"):
        load_preferences(tmp_path / "prefs.pkl")


def test_errors_format_and_survive_pickling():
    error = DataValidationError("prefs.jsonl", 12, "chosen", "empty string")
    assert str(error) == "prefs.jsonl: row 12, field 'chosen': empty string"
    assert str(DataValidationError("prefs.jsonl", 3, None, "duplicate of row 0")) == "prefs.jsonl: row 3: duplicate of row 0"
    assert str(DataValidationError("prefs.jsonl", None, None, "file is empty")) == "prefs.jsonl: file is empty"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.row, copy.field, copy.problem, str(copy)) == (
        "prefs.jsonl", 12, "chosen", "empty string", str(error)
    )


def test_check_data_summary(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    report = check_data(path)
    fingerprint = fingerprint_frame(expected_frame(ROWS))
    assert report.splitlines() == [
        f"ok: {path}",
        "  format: standard",
        "  rows: 3 valid, 0 bad, 3 read",
        "  columns: prompt, chosen, rejected",
        f"  fingerprint: {fingerprint}",
    ]
    assert check_data(tmp_path / "missing.jsonl").startswith("unusable:")


# ------------------------------------------------------------------------------ writing


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out" / "prefs.jsonl"
    write_preferences(expected_frame(ROWS), target)
    assert [p.name for p in target.parent.iterdir()] == ["prefs.jsonl"]
    before = target.read_bytes()

    unserialisable = pd.DataFrame({"prompt": ["a"], "chosen": [object()], "rejected": ["b"]})
    with pytest.raises(TypeError):
        write_preferences(unserialisable, target)
    assert target.read_bytes() == before  # the old file is untouched
    assert [p.name for p in target.parent.iterdir()] == ["prefs.jsonl"]


def test_write_rejects_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match="writes .jsonl or .parquet"):
        write_preferences(expected_frame(ROWS), tmp_path / "prefs.csv")


def test_preference_data_is_frozen_and_short_to_print(tmp_path):
    loaded = load_preferences(write_jsonl(tmp_path / "p.jsonl", ROWS))
    assert isinstance(loaded, PreferenceData)
    with pytest.raises(AttributeError):
        loaded.source = "other"
    assert repr(loaded).startswith("PreferenceData(source=") and "rows=3" in repr(loaded)
    assert data_module.PAIR_MODES.keys() == {"all_pairs", "best_vs_worst", "adjacent"}
