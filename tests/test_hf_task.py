"""The hf task, offline: a tiny GPT-2 and a tokenizer with a chat template saved by the test with
``save_pretrained`` and loaded through the code path a hub id takes; preference data in the three
TRL formats written as jsonl and parquet; exact outputs of the column mapping, the implicit-prompt
split, the chat-template rendering and the judge selection; honest metric names."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpo_bench.bench import from_dict_config, load_config
from dpo_bench.configs import ConfigError, from_dict
from dpo_bench.data import DataValidationError
from dpo_bench.judges import ClassifierJudge, RewardModelJudge
from dpo_bench.policy import (
    LoRASpec, apply_lora, enable_gradient_checkpointing, freeze_first_blocks, is_gradient_checkpointing, load_policy,
    resolve_dtype, save_policy,
)
from dpo_bench.tasks.hf import HFConfig, HFTask, split_prompts
from pipelines.cli import main

GOOD = ["great", "fun", "moving", "sharp", "warm"]
BAD = ["dull", "slow", "flat", "messy", "cold"]
NOUNS = ["film", "plot", "cast", "score", "ending", "script", "story", "acting"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
JUDGE_MODULE = "dpo_bench_test_judges"
JUDGE_SOURCE = '''
def char_codes(prompts, completions):
    """A deterministic score that rarely ties: the mean character code of the completion."""
    return [sum(map(ord, c)) / max(1, len(c)) for c in completions]


def good_words(prompts, completions):
    """+1 for every positive word, -1 for every negative one."""
    good, bad = {"great", "fun", "moving", "sharp", "warm"}, {"dull", "slow", "flat", "messy", "cold"}
    return [sum((w in good) - (w in bad) for w in c.split()) for c in completions]
'''
# Small enough for seconds per run: the quick preset with these sizes on top.
SMALL_TOML = """
[hf]
max_new_tokens = 6
max_length = 40
max_eval_prompts = 2
eval_fraction = 0.25

[sft]
steps = 3
batch_size = 8
warmup_steps = 1

[reward_model]
steps = 3
batch_size = 8

[evaluation]
n_checkpoints = 1
n_saved_prompts = 2

[[grid]]
method = "sft"

[[grid]]
method = "dpo"
values = [0.5]
config = { steps = 2, batch_size = 8 }

[[grid]]
method = "ppo"
values = [0.1]
config = { iterations = 1, rollout_batch = 4, epochs = 1 }
"""


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"the {n} was {a} and {b}" for n in NOUNS for a in GOOD + BAD for b in GOOD + BAD]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _rows() -> list[dict]:
    return [{"prompt": f"the {n} was", "chosen": f" {GOOD[(i + j) % 5]} and {GOOD[(i + j + 1) % 5]}",
             "rejected": f" {BAD[(i + j) % 5]} and {BAD[(i + j + 2) % 5]}"} for i, n in enumerate(NOUNS) for j in range(2)]


def _format_rows(fmt: str) -> list[dict]:
    rows = _rows()
    if fmt == "implicit":
        return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    if fmt == "conversational":
        return [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                 "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]
    return rows


def _write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny causal LM with a chat-template tokenizer, a tiny classifier, a registered judge."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("hf")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = dict(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    classifier = GPT2ForSequenceClassification(GPT2Config(**config, num_labels=2, id2label={0: "NEG", 1: "POS"},
                                                          label2id={"NEG": 0, "POS": 1}, pad_token_id=tokenizer.eos_token_id))
    classifier.save_pretrained(root / "classifier")
    tokenizer.save_pretrained(root / "classifier")
    # A package registering a judge in the dpo_bench.judges entry-point group, as pip would install it.
    plugin = root / "plugin"
    plugin.mkdir()
    (plugin / f"{JUDGE_MODULE}.py").write_text(JUDGE_SOURCE)
    info = plugin / f"{JUDGE_MODULE}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {JUDGE_MODULE}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[dpo_bench.judges]\ngood_words = {JUDGE_MODULE}:good_words\nchar_codes = {JUDGE_MODULE}:char_codes\n")
    sys.path.insert(0, str(plugin))
    (root / "small.toml").write_text(SMALL_TOML)
    yield root
    sys.path.remove(str(plugin))


def _task(workspace: Path, tmp_path: Path, rows: list[dict], name: str = "data.jsonl", **fields) -> HFTask:
    data = _write(rows, tmp_path / name)
    config = HFConfig(model=str(workspace / "model"), data=str(data), max_new_tokens=6, max_length=40, **fields)
    HFTask.prepare(config, tmp_path / "task")
    return HFTask(config, tmp_path / "task")


# --- the run, on every format ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("fmt", ["standard", "implicit", "conversational"])
def test_quick_preset_runs_on_every_format(workspace, tmp_path, fmt, suffix):
    data = _write(_format_rows(fmt), tmp_path / f"prefs{suffix}")
    code = main(["run", "--task", "hf", "--model", str(workspace / "model"), "--data", str(data), "--preset", "quick",
                 "--config", str(workspace / "small.toml"), "--no-prefect", "--quiet",
                 "--reports-dir", str(tmp_path / "reports"), "--run-id", "r"])
    assert code == 0
    run_dir = tmp_path / "reports" / "r"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed", record["cells"]
    assert record["task"] == "hf" and {"data", "train_prompts", "eval_prompts", "preferences"} <= set(record["fingerprints"])
    assert record["preferences"]["n_pairs"] == 16 and record["preferences"]["n_heldout_pairs"] == 4
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    evals = metrics[metrics["temperature"] == 1.0]
    # No gold scorer: nothing is called gold, not even a training curve; no fluency is invented.
    assert not metrics["metric"].str.contains("gold").any()
    assert "fluency" not in set(metrics["metric"]) and "rm_bayes_ceiling" not in set(metrics["metric"])
    assert {"sft", "dpo", "ppo"} <= set(evals.loc[evals["metric"] == "judge_reward", "method"])
    assert np.isfinite(evals.loc[evals["metric"].isin(["judge_reward", "win_rate", "kl"]), "value"]).all()
    assert "train/judge_reward" in set(metrics["metric"])
    samples = pd.read_parquet(run_dir / "samples.parquet")
    assert {"judge_reward", "ref_judge_reward"} <= set(samples.columns) and "gold_reward" not in samples.columns
    report = (run_dir / "report.md").read_text()
    assert "judged by the learned reward model, a proxy" in report
    assert "| judge reward (learned RM) ± s.e. |" in report and "gold reward ±" not in report


def test_a_registered_judge_declared_gold_labels_sampled_text_preferences(workspace, tmp_path):
    """The paper's set-up in small: text data, prefixes as prompts, preferences sampled and
    labelled by the judge, which is declared gold and so reported as gold_reward."""
    texts = tmp_path / "reviews.jsonl"
    _write([{"review": f"the {n} was {a} and {b} ."} for n in NOUNS for a in GOOD[:3] + BAD[:3] for b in GOOD[3:]], texts)
    config = tmp_path / "text.toml"
    config.write_text((SMALL_TOML + """
[hf.column_map]
review = "text"

[preferences]
k = 3
""").replace("[hf]\n", '[hf]\ndata_format = "text"\nreference = "text_ft"\njudge = "char_codes"\njudge_is_gold = true\n'))
    code = main(["run", "--task", "hf", "--model", str(workspace / "model"), "--data", str(texts), "--preset", "quick",
                 "--config", str(config), "--no-prefect", "--quiet", "--reports-dir", str(tmp_path / "reports"), "--run-id", "r"])
    assert code == 0
    run_dir = tmp_path / "reports" / "r"
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert "judge_reward" not in set(metrics["metric"])
    assert {"sft", "dpo", "ppo"} <= set(metrics.loc[metrics["metric"] == "gold_reward", "method"])
    record = json.loads((run_dir / "run.json").read_text())
    # K = 3 completions per prefix, each of their 3 pairs labelled by Bradley-Terry on the judge.
    prefs = record["preferences"]
    assert prefs["n_pairs"] + prefs["n_dropped_ties"] + prefs["n_dropped_repeats"] == 3 * prefs["n_prompts"] > 0
    assert "No gold reward" not in (run_dir / "report.md").read_text()


# --- exact outputs -------------------------------------------------------------------------------


def test_stack_exchange_columns_are_mapped(workspace, tmp_path):
    rows = [{"qid": i, "question": f"the {n} was", "response_j": f" {GOOD[i % 5]}", "response_k": f" {BAD[i % 5]}"}
            for i, n in enumerate(NOUNS)]
    task = _task(workspace, tmp_path, rows, column_map={"question": "prompt", "response_j": "chosen", "response_k": "rejected"})
    frame = pd.read_parquet(tmp_path / "task" / "data.parquet")
    assert frame[["prompt", "chosen", "rejected"]].values.tolist()[:3] == [
        ["the film was", " great", " dull"], ["the plot was", " fun", " slow"], ["the cast was", " moving", " flat"]]
    assert task.format == "standard" and sorted(task.train_prompts + task.eval_prompts) == sorted(f"the {n} was" for n in NOUNS)
    assert not set(task.train_prompts) & set(task.eval_prompts)


def test_implicit_prompt_is_the_shared_prefix(workspace, tmp_path):
    rows = [{"chosen": "the film was great and fun", "rejected": "the film was dull"},
            {"chosen": "the plot was sharp", "rejected": "the plot was messy and slow"}]
    task = _task(workspace, tmp_path, rows, eval_fraction=0.5)
    frame = pd.read_parquet(tmp_path / "task" / "data.parquet")
    assert frame[["prompt", "chosen", "rejected"]].values.tolist() == [
        ["the film was", " great and fun", " dull"], ["the plot was", " sharp", " messy and slow"]]
    assert task.format == "implicit"


def test_conversations_are_rendered_with_the_chat_template(workspace, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"how was the {n}?"}],
             "chosen": [{"role": "assistant", "content": "great"}],
             "rejected": [{"role": "assistant", "content": "dull"}]} for n in NOUNS[:4]]
    task = _task(workspace, tmp_path, rows, name="chat.parquet")
    frame = pd.read_parquet(tmp_path / "task" / "data.parquet")
    assert frame[["prompt", "chosen", "rejected"]].values.tolist()[0] == [
        "<|user|>how was the film?<|endoftext|><|assistant|>", "great<|endoftext|>", "dull<|endoftext|>"]
    eos = task.tokenizer.eos_token_id
    # The template's own end-of-turn token closes the completion; none is added twice.
    completion = task.encode_completion("great<|endoftext|>")
    assert completion[-1] == eos and completion.count(eos) == 1
    assert task.encode_prompt(frame["prompt"][0]) == task.tokenizer(frame["prompt"][0], add_special_tokens=False)["input_ids"]


def test_implicit_prompt_conversations_in_shards_are_rendered_like_explicit_ones(workspace, tmp_path):
    # TRL's conversational layout without a prompt column, in a folder of jsonl shards.
    rows = [{"chosen": [{"role": "user", "content": f"how was the {n}?"}, {"role": "assistant", "content": "great"}],
             "rejected": [{"role": "user", "content": f"how was the {n}?"}, {"role": "assistant", "content": "dull"}]}
            for n in NOUNS[:4]]
    (tmp_path / "shards").mkdir()
    _write(rows[:2], tmp_path / "shards" / "train-00000.jsonl")
    _write(rows[2:], tmp_path / "shards" / "train-00001.jsonl")
    config = HFConfig(model=str(workspace / "model"), data=str(tmp_path / "shards"), max_new_tokens=6, max_length=40)
    HFTask.prepare(config, tmp_path / "task")
    task = HFTask(config, tmp_path / "task")
    frame = pd.read_parquet(tmp_path / "task" / "data.parquet")
    assert task.format == "implicit_conversational" and len(frame) == 4
    assert frame[["prompt", "chosen", "rejected"]].values.tolist()[0] == [
        "<|user|>how was the film?<|endoftext|><|assistant|>", "great<|endoftext|>", "dull<|endoftext|>"]
    # Rendered prompts carry the template's special tokens: none is added when encoding.
    assert task.encode_prompt(frame["prompt"][0]) == task.tokenizer(frame["prompt"][0], add_special_tokens=False)["input_ids"]


def test_a_glob_of_shards_is_local_data_fingerprinted_by_its_files(workspace, tmp_path, capsys):
    rows = _rows()
    (tmp_path / "shards").mkdir()
    _write(rows[:4], tmp_path / "shards" / "train-00000.jsonl")
    second = _write(rows[4:], tmp_path / "shards" / "train-00001.jsonl")
    pattern = str(tmp_path / "shards" / "train-*.jsonl")
    config = HFConfig(model=str(workspace / "model"), data=pattern, max_new_tokens=6, max_length=40)
    assert config.missing_paths() == [] and ("dataset", f"{pattern} (splits train)", "local") in config.downloads()
    assert HFConfig(model=str(workspace / "model"), data=str(tmp_path / "none-*.jsonl")).missing_paths() == [
        ("data", str(tmp_path / "none-*.jsonl"))]
    HFTask.prepare(config, tmp_path / "task")
    assert len(pd.read_parquet(tmp_path / "task" / "data.parquet")) == len(rows)
    before = HFTask.source_fingerprint(config)["data"]
    _write(rows[4:-1], second)  # a matched file changes: the stages built on it are stale
    assert HFTask.source_fingerprint(config)["data"] != before
    # --methods leaves out the default grid's ppo_gt before the config is checked: no judge is needed.
    assert main(["run", "--task", "hf", "--model", str(workspace / "model"), "--data", pattern, "--methods", "dpo",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would download from the hub:" not in out


def test_too_long_rows_stop_the_run_or_are_skipped(workspace, tmp_path):
    rows = _rows()[:6] + [{"prompt": "the film was", "chosen": " great" * 40, "rejected": " dull"}]
    with pytest.raises(DataValidationError, match="row 6, field 'chosen': prompt \\+ completion is .* more than max_length 40"):
        _task(workspace, tmp_path, rows)
    task = _task(workspace, tmp_path, rows, on_bad_rows="skip")
    assert task.info["n_dropped"] == 1 and task.info["n_rows"] == 6


def test_the_prompt_split_is_disjoint_stable_and_capped():
    prompts = [f"prompt {i}" for i in range(40)]
    train, evaluation = split_prompts(prompts, 0.25, 1000, seed=0)
    assert len(evaluation) == 10 and len(train) == 30 and not set(train) & set(evaluation)
    assert split_prompts(list(reversed(prompts)), 0.25, 1000, seed=0)[1] == list(reversed(evaluation))
    assert len(split_prompts(prompts, 0.25, 4, seed=0)[1]) == 4


# --- judges ----------------------------------------------------------------------------------------


def test_judge_selection(workspace, tmp_path):
    task = _task(workspace, tmp_path, _rows())
    # The default: the learned reward model, a proxy. Before it exists there is no judge.
    assert task.judge() is None and task.gold is None
    assert not task.has_gold and task.reward_metric == "judge_reward"
    assert isinstance(task.judge(reward_model=object()), RewardModelJudge)
    # A judge a package registered in the dpo_bench.judges entry-point group.
    registered = HFTask(HFConfig(model=task.config.model, data=task.config.data, judge="good_words"), tmp_path / "task")
    assert registered.judge().score(["a", "b"], [" great and fun", " dull and great"]).tolist() == [2.0, 0.0]
    assert registered.reward_metric == "judge_reward"
    gold = HFTask(HFConfig(model=task.config.model, data=task.config.data, judge="good_words", judge_is_gold=True), tmp_path / "task")
    assert gold.reward_metric == "gold_reward" and gold.judge().is_gold
    # A sequence-classification model: the logit of the named label.
    judge = HFTask(HFConfig(model=task.config.model, data=task.config.data, judge="classifier",
                            judge_model=str(workspace / "classifier"), judge_label="POS"), tmp_path / "task").judge()
    assert isinstance(judge, ClassifierJudge) and judge.index == 1
    with torch.no_grad():
        enc = judge.tokenizer(["the film was great"], return_tensors="pt")
        expected = judge.model(**enc).logits[0, 1].item()
    assert judge.score(["the film was"], [" great"])[0] == pytest.approx(expected, abs=1e-6)


def test_judge_configs_are_checked(workspace):
    model = str(workspace / "model")
    with pytest.raises(ConfigError, match="unknown judge 'nope'; known judges: reward_model, classifier, char_codes, good_words"):
        HFConfig(model=model, data="x.jsonl", judge="nope")
    with pytest.raises(ConfigError, match="never the gold reward"):
        HFConfig(judge_is_gold=True)
    with pytest.raises(ConfigError, match="judge_model"):
        HFConfig(judge="classifier")
    with pytest.raises(ConfigError, match="text_ft"):
        HFConfig(data_format="text", judge="good_words")
    with pytest.raises(ConfigError, match="ppo_gt"):
        load_config("quick", overrides={"task": "hf", "hf": {"model": model, "data": "x.jsonl"},
                                        "grid": [{"method": "ppo_gt"}]})
    with pytest.raises(ConfigError, match="hf.model"):
        load_config("quick", overrides={"task": "hf"})
    # Labels that come with the data cannot be drawn at another temperature; sampled ones can.
    with pytest.raises(ConfigError, match="checks.label_temperatures: this task's preference data carries its own labels"):
        load_config("quick", overrides={"task": "hf", "hf": {"model": model, "data": "x.jsonl"}, "checks": {"label_temperatures": [1.0]}})
    load_config("quick", overrides={"task": "hf", "hf": {"model": model, "data": "x.txt", "data_format": "text",
                                                         "reference": "text_ft", "judge": "good_words"},
                                    "checks": {"label_temperatures": [1.0]}})
    with pytest.raises(ValueError, match="set judge_label"):
        ClassifierJudge(str(workspace / "classifier"))


# --- configs, presets, the dry run -------------------------------------------------------------


def test_the_hf_config_survives_the_flow_round_trip(workspace):
    config = load_config("quick", overrides={"task": "hf", "hf": {
        "model": str(workspace / "model"), "data": "d.jsonl", "column_map": {"question": "prompt"}, "lora": {"r": 4}}})
    assert from_dict_config(config.to_dict()) == config
    assert config.hf.lora == LoRASpec(r=4) and config.hf.column_map == {"question": "prompt"}
    with pytest.raises(ConfigError, match=r"hf: eval_fraction must be in \(0, 1\), got 2.0"):
        from_dict(HFConfig, {"eval_fraction": 2.0}, "hf")


def test_the_docs_example_config_is_complete_and_valid(tmp_path):
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "own-model.md").read_text()
    block = re.search(r"<!-- example-hf-config -->\s*```toml\n(.*?)```", text, re.S).group(1)
    (tmp_path / "example.toml").write_text(block)
    config = load_config(path=tmp_path / "example.toml")
    assert config.task == "hf" and config.hf.column_map == {"question": "prompt", "response_j": "chosen", "response_k": "rejected"}
    keys = set(re.findall(r"^(\w+) =", block.split("[hf]")[1].split("[hf.column_map]")[0], re.M))
    assert keys == set(HFConfig.__dataclass_fields__) - {"column_map"}  # every hf key is shown


def test_paper_preset_is_valid_and_its_dry_run_lists_the_downloads(capsys):
    config = load_config("paper")
    assert config.task == "hf" and config.hf.model == "gpt2-large" and config.hf.judge_is_gold
    assert (config.hf.min_prompt_tokens, config.hf.max_prompt_tokens) == (2, 8)
    assert config.preferences.k == 4 and config.preferences.pairs_from_rankings == "all_pairs"
    cells = config.cells()
    assert sorted(c.value for c in cells if c.method == "dpo") == [0.05, 0.1, 1.0, 5.0]
    assert sorted(c.config().target_kl for c in cells if c.method == "ppo") == [3.0, 6.0, 9.0, 12.0]
    assert main(["run", "--preset", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in ("would download from the hub:", "  model: gpt2-large", "  dataset: stanfordnlp/imdb (splits train, test)",
                 "  judge: lvwerra/distilbert-imdb", "judge: classifier lvwerra/distilbert-imdb (declared the gold reward)",
                 "  dpo β=0.05 seed=0", "  ppo_kl12 kl_coef=0.1 seed=0"):
        assert line in out.splitlines(), line


def test_model_flags_belong_to_the_hf_task(capsys):
    assert main(["run", "--task", "sentiment", "--model", "gpt2", "--dry-run"]) == 2
    assert "--model and --data belong to the hf task" in capsys.readouterr().err


# --- loading, precision, memory savers ------------------------------------------------------------


def test_the_model_loads_like_a_hub_model_with_dropout_off(workspace, tmp_path):
    task = _task(workspace, tmp_path, _rows(), gradient_checkpointing=True)
    model = task.initial_model(seed=0)
    assert type(model).__name__ == "GPT2LMHeadModel" and next(model.parameters()).dtype == torch.float32
    assert model.config.resid_pdrop == 0.0 and all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert is_gradient_checkpointing(model) and is_gradient_checkpointing(copy.deepcopy(model))
    save_policy(model, tmp_path / "saved")
    reloaded = HFTask.load_model(task.config, tmp_path / "saved", torch.device("cpu"))
    assert is_gradient_checkpointing(reloaded) and reloaded.config.attn_pdrop == 0.0
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_freezing_blocks_finds_the_blocks_of_other_architectures():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    freeze_first_blocks(model, 2, embeddings=True)
    frozen = [all(not p.requires_grad for p in layer.parameters()) for layer in model.model.layers]
    assert frozen == [True, True, False] and not model.model.embed_tokens.weight.requires_grad
    enable_gradient_checkpointing(model)
    assert is_gradient_checkpointing(model)


def test_lora_without_peft_is_a_clear_error(workspace, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    model = load_policy(workspace / "model")
    with pytest.raises(ImportError, match=r"pip install 'dpo-bench\[lora\]'"):
        apply_lora(model, LoRASpec(r=4))


def test_lora_trains_adapters_and_saves_a_plain_model(workspace, tmp_path):
    pytest.importorskip("peft")
    model = apply_lora(load_policy(workspace / "model"), LoRASpec(r=2, target_modules=("c_attn",)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    save_policy(model, tmp_path / "merged")
    assert type(load_policy(tmp_path / "merged")).__name__ == "GPT2LMHeadModel"


def test_max_length_fits_the_model_when_no_length_is_set(workspace, tmp_path):
    """hf.max_length 0 (the default): the model's positions less one for EOS, here 63 of 64; a run
    with no length setting goes through. A cap given explicitly that exceeds them is refused."""
    data = _write(_format_rows("standard"), tmp_path / "prefs.jsonl")
    (tmp_path / "small.toml").write_text(SMALL_TOML.replace("max_length = 40\n", ""))
    code = main(["run", "--task", "hf", "--model", str(workspace / "model"), "--data", str(data), "--preset", "quick",
                 "--config", str(tmp_path / "small.toml"), "--no-prefect", "--quiet",
                 "--reports-dir", str(tmp_path / "reports"), "--run-id", "r"])
    assert code == 0
    record = json.loads((tmp_path / "reports" / "r" / "run.json").read_text())
    assert record["status"] == "completed" and record["config"]["hf"]["max_length"] == 0
    task_dir = Path(record["cache_dir"]) / "task" / record["pipelines"]["0"]["stage_keys"]["task"]
    assert json.loads((task_dir / "prompts.json").read_text())["max_length"] == 63
    with pytest.raises(ConfigError, match="hf.max_length: 100 tokens \\(\\+ EOS\\) exceed the model's 64 positions"):
        HFTask.prepare(HFConfig(model=str(workspace / "model"), data=str(data), max_new_tokens=6, max_length=100), tmp_path / "t")


def test_a_file_with_one_prompt_is_a_one_line_error(workspace, tmp_path, capsys):
    """Nothing to hold out for evaluation: the run stops on one line naming the file, no traceback."""
    rows = [{"prompt": "the film was", "chosen": good, "rejected": bad} for good, bad in zip(GOOD, BAD)]
    data = _write(rows, tmp_path / "one.jsonl")
    code = main(["run", "--task", "hf", "--model", str(workspace / "model"), "--data", str(data), "--preset", "quick",
                 "--config", str(workspace / "small.toml"), "--no-prefect", "--quiet",
                 "--reports-dir", str(tmp_path / "reports"), "--run-id", "r"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (f"dpo-bench: {data}: need at least 2 distinct prompts to split into train and eval, got 1; give more prompts, "
            "or hf.eval_split for separate eval data") in err.splitlines()


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_check_data_with_a_model_names_the_rows_too_long_for_it(workspace, tmp_path, capsys, fmt):
    """`check-data FILE --model DIR`: every row's prompt + completion against the max_length a run
    would take for the model by default (its 64 positions less EOS: 63 tokens), through its chat
    template for conversational rows; a row too long is a problem naming its row and field."""
    from pipelines.cli import main

    rows = _format_rows(fmt)
    long = " ".join(["good"] * 80)
    if fmt == "conversational":
        rows[3] = {**rows[3], "rejected": [{"role": "assistant", "content": long}]}
    else:
        rows[3] = {**rows[3], "rejected": " " + long}
    path = _write(rows, tmp_path / "data.jsonl")
    assert main(["check-data", str(path), "--model", str(workspace / "model")]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"problems: {path}"
    assert (f"lengths: prompt + completion within 63 tokens of {workspace / 'model'}'s tokenizer (hf.max_length's default: "
            "its 64 positions less EOS); 1 rows longer") in out
    assert "row 3, field 'rejected': prompt + completion is" in out and "more than max_length 63" in out
    assert main(["check-data", str(_write(_format_rows(fmt), tmp_path / "ok.jsonl")), "--model", str(workspace / "model")]) == 0
    assert "; 0 rows longer" in capsys.readouterr().out


def test_check_data_refuses_a_model_path_that_does_not_exist(tmp_path, capsys):
    from pipelines.cli import main

    path = _write(_rows(), tmp_path / "data.jsonl")
    assert main(["check-data", str(path), "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"dpo-bench: --model: file not found: {tmp_path / 'nowhere'}"
