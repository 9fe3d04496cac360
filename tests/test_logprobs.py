"""Log-probs with the prompt masked, padding-invariance, and KV-cached sampling."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_bench.generation import sample
from dpo_bench.logprobs import collate, concat_batches, sequence_logps, token_logps
from dpo_bench.policy import GPT2Spec, TabularLM, build_gpt2


class _Tok:
    def __init__(self, n):
        self.n = n
        self.bos_token_id = self.eos_token_id = 1
        self.pad_token_id = 0

    def __len__(self):
        return self.n


def _model(seed=0):
    model = build_gpt2(GPT2Spec(n_layer=1, n_embd=32, n_head=2, n_positions=32), _Tok(20), seed)
    return model.eval()


def _manual_logp(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0]
    logps = torch.log_softmax(logits, -1)
    return sum(logps[len(prompt) + i - 1, tok].item() for i, tok in enumerate(completion))


def test_sequence_logps_counts_only_completion_tokens():
    model = _model()
    prompts, completions = [[1, 5, 6], [1, 7]], [[8, 9, 1], [3, 1]]
    batch = collate(prompts, completions, pad_id=0)
    got = sequence_logps(model, batch)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        assert abs(got[i].item() - _manual_logp(model, p, c)) < 1e-5
    # Prompt tokens carry no log-prob: the mask marks exactly the completion.
    assert batch.completion_mask.sum().item() == 5
    assert (token_logps(model, batch) != 0).sum().item() == 5


def test_logps_do_not_depend_on_padding_or_batch_mates():
    model = _model()
    alone = sequence_logps(model, collate([[1, 5]], [[6, 1]], pad_id=0))
    with_long_mate = sequence_logps(model, collate([[1, 5], [1, 2, 3, 4, 5, 6]], [[6, 1], [7, 8, 9, 1]], pad_id=0))
    assert torch.allclose(alone[0], with_long_mate[0], atol=1e-5)


def test_left_padded_samples_score_like_right_padded_pairs():
    model = _model()
    s = sample(model, [[1, 5, 6], [1]], max_new_tokens=6, eos_id=1, pad_id=0, generator=torch.Generator().manual_seed(0))
    right = collate(s.prompt_ids, s.completion_ids, pad_id=0)
    assert torch.allclose(sequence_logps(model, s.batch), sequence_logps(model, right), atol=1e-5)


def test_greedy_kv_cached_sampling_matches_full_forward_argmax():
    model = _model(3)
    prompt = [1, 4, 5]
    s = sample(model, [prompt], max_new_tokens=8, eos_id=None, pad_id=0, generator=torch.Generator(), temperature=0)
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert s.completion_ids[0] == ids[len(prompt):]


def test_sampling_stops_at_eos_and_is_seeded():
    model = _model(1)
    kwargs = dict(max_new_tokens=10, eos_id=1, pad_id=0)
    a = sample(model, [[1, 2]] * 16, generator=torch.Generator().manual_seed(7), **kwargs)
    b = sample(model, [[1, 2]] * 16, generator=torch.Generator().manual_seed(7), **kwargs)
    assert a.completion_ids == b.completion_ids
    for c in a.completion_ids:
        assert 1 <= len(c) <= 10
        assert 1 not in c[:-1]  # nothing after eos


def test_draw_follows_each_rows_distribution_and_never_draws_a_zero():
    from dpo_bench.generation import draw

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3], [0.0, 0.0, 2.0, 6.0]])  # the second row unnormalised
    n = 40_000
    drawn = draw(probs.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, 2)
    for row in range(2):
        expected = probs[row] / probs[row].sum()
        freq = torch.bincount(drawn[:, row], minlength=4).double() / n
        se = (expected * (1 - expected) / n).sqrt().double()
        assert ((freq - expected.double()).abs() <= 5 * se + 1e-12).all(), (row, freq, expected)
        assert (freq[expected == 0] == 0).all()
    a = draw(probs, torch.Generator().manual_seed(3))
    assert a.equal(draw(probs, torch.Generator().manual_seed(3)))


@given(st.lists(st.lists(st.sampled_from([0.0, 1e-30, 1e-6, 0.3, 1.0, 7.0]), min_size=1, max_size=6), min_size=1, max_size=5),
       st.integers(0, 2**31))
@settings(max_examples=100, deadline=None)
def test_draw_picks_a_positive_probability_index(rows, seed):
    from dpo_bench.generation import draw

    width = max(len(r) for r in rows)
    probs = torch.tensor([r + [0.0] * (width - len(r)) for r in rows])
    probs[probs.sum(-1) == 0, 0] = 1.0  # every row needs some mass
    picked = draw(probs, torch.Generator().manual_seed(seed))
    assert (probs[torch.arange(len(rows)), picked] > 0).all()


def test_tabular_policy_is_a_table_behind_the_lm_interface():
    allowed = torch.tensor([False, False, False, True, True])
    table = torch.zeros(5, 5)
    table[2, 3], table[2, 4] = 1.0, 0.0
    model = TabularLM(5, allowed, table)
    batch = collate([[2], [2]], [[3], [4]], pad_id=0)
    got = sequence_logps(model, batch)
    expected = torch.log_softmax(torch.tensor([1.0, 0.0]), 0)
    assert torch.allclose(got, expected)
    s = sample(model, [[2]] * 200, max_new_tokens=1, eos_id=1, pad_id=0, generator=torch.Generator().manual_seed(0))
    assert {c[0] for c in s.completion_ids} <= {3, 4}


def test_collate_pads_on_the_right_and_marks_the_completion():
    batch = collate([[1], [1, 4, 5], []], [[2, 3], torch.tensor([6]), [7]], pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 3, 9], [1, 4, 5, 6], [7, 9, 9, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch.completion_mask.tolist() == [[0, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.completion_mask.dtype == torch.long
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        collate([[1], [1]], [[2]], pad_id=0)


def test_concat_batches_keeps_rows():
    a = collate([[1]], [[2, 3]], 0)
    b = collate([[1, 4, 5]], [[6]], 0)
    both = concat_batches(a, b, 0)
    assert both.input_ids.tolist() == [[1, 2, 3, 0], [1, 4, 5, 6]]
    assert both.completion_mask.tolist() == [[0, 1, 1, 0], [0, 0, 0, 1]]


# --- length groups and completion-only logits ----------------------------------------------------

import itertools  # noqa: E402

from dpo_bench.logprobs import (  # noqa: E402
    forward, gather_token_logps, keeps_selected_logits, kl_rows, token_kl_terms, token_log_distributions,
)
from dpo_engine.batching import length_groups  # noqa: E402


def _cost(groups, lengths, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


@given(st.lists(st.integers(1, 12), min_size=1, max_size=9), st.integers(0, 40))
@settings(max_examples=150, deadline=None)
def test_length_groups_partition_the_rows_at_least_cost(lengths, overhead):
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    # Groups are contiguous in length: no row of a later group is shorter than one of an earlier.
    for a, b in zip(groups, groups[1:]):
        assert max(lengths[i] for i in a) <= min(lengths[i] for i in b)
    # Optimal among every way of cutting the sorted rows into contiguous groups.
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = min(
        _cost([order[i:j] for i, j in zip((0, *cuts), (*cuts, len(order)))], lengths, overhead)
        for k in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), k)
    )
    assert _cost(groups, lengths, overhead) == best


def test_length_groups_extremes():
    assert length_groups([5, 3, 9], overhead=10**6) == [[1, 0, 2]]
    assert length_groups([5, 3, 9, 3], overhead=0) == [[1, 3], [0], [2]]
    assert length_groups([]) == []


def _mixed_batch(seed, rows=24):
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for i in range(rows):
        n_p = int(torch.randint(1, 4, (1,), generator=g))
        n_c = 1 + (i % 3) * 8 + int(torch.randint(0, 3, (1,), generator=g))  # three length clusters
        prompts.append([1] + torch.randint(2, 20, (n_p,), generator=g).tolist())
        completions.append(torch.randint(2, 20, (n_c,), generator=g).tolist())
    return collate(prompts, completions, pad_id=0)


def test_grouped_forward_gives_the_padded_forwards_numbers_and_gradients(monkeypatch):
    monkeypatch.setattr("dpo_engine.batching.GROUP_OVERHEAD_TOKENS", 16)
    batch = _mixed_batch(0)
    assert len(length_groups(batch.attention_mask.sum(-1))) > 1  # the test must exercise grouping
    values, grads = [], []
    for group in (False, True):
        model = _model(5).train()
        model.config.attn_pdrop = model.config.resid_pdrop = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        logps = token_logps(model, batch, group=group)
        (logps.sum(-1) * torch.linspace(-1, 1, len(batch))).sum().backward()
        values.append(logps.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(values[0], values[1], atol=1e-5)
    assert (values[1] == 0).equal(batch.completion_mask[:, 1:] == 0)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_completion_only_logits_match_the_full_vocabulary_projection():
    model = _model(2)
    assert keeps_selected_logits(model)
    batch = _mixed_batch(1, rows=10)
    full = gather_token_logps(forward(model, batch).logits, batch.input_ids).masked_fill(batch.completion_mask[:, 1:] == 0, 0.0)
    assert torch.allclose(token_logps(model, batch, group=False), full, atol=1e-5)


def test_models_without_selected_logits_use_the_full_logits():
    allowed = torch.tensor([False, False, False, True, True])
    assert not keeps_selected_logits(TabularLM(5, allowed, torch.zeros(5, 5)))


def test_ppo_log_probs_and_values_in_length_groups_match_one_padded_pass(monkeypatch):
    from dpo_bench.methods.ppo import PolicyWithValueHead

    batch = _mixed_batch(2)
    model = PolicyWithValueHead(_model(4))
    torch.nn.init.normal_(model.value_head.weight)
    mask = batch.completion_mask[:, 1:].bool()
    monkeypatch.setattr("dpo_engine.batching.GROUP_OVERHEAD_TOKENS", 16)
    assert len(length_groups(batch.attention_mask.sum(-1))) > 1
    logps, values = model.logps_and_values(batch)
    monkeypatch.setattr("dpo_engine.batching.GROUP_OVERHEAD_TOKENS", 10**9)
    whole_logps, whole_values = model.logps_and_values(batch)
    assert torch.allclose(logps, whole_logps, atol=1e-5)
    # Values count only on completion tokens (GAE and the value loss mask the rest).
    assert torch.allclose(values[mask], whole_values[mask], atol=1e-5)


def test_ppo_full_distributions_in_length_groups_match_one_padded_pass(monkeypatch):
    """``full``: the next-token log-distributions (B, T-1, V) come back in row order through the
    length groups, zero off the completion, and pick out the same log-probs."""
    from dpo_bench.methods.ppo import PolicyWithValueHead

    batch = _mixed_batch(3)
    model = PolicyWithValueHead(_model(6))
    mask = batch.completion_mask[:, 1:].bool()
    monkeypatch.setattr("dpo_engine.batching.GROUP_OVERHEAD_TOKENS", 16)
    assert len(length_groups(batch.attention_mask.sum(-1))) > 1
    logps, _, dists = model.logps_and_values(batch, full=True)
    monkeypatch.setattr("dpo_engine.batching.GROUP_OVERHEAD_TOKENS", 10**9)
    _, _, whole = model.logps_and_values(batch, full=True)
    assert dists.shape == (*mask.shape, model.policy.config.vocab_size)
    assert torch.allclose(dists, whole, atol=1e-5)
    assert (dists[~mask] == 0).all()
    assert torch.allclose(dists[mask].exp().sum(-1), torch.ones(int(mask.sum())), atol=1e-5)
    picked = dists.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(picked[mask], logps[mask], atol=1e-6)
    assert torch.allclose(token_log_distributions(model.policy, batch), whole, atol=1e-5)


def test_token_kl_terms_are_kl_rows_at_the_masked_positions():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7, generator=g)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.float32)
    terms = token_kl_terms(torch.log_softmax(p, -1), torch.log_softmax(q, -1), mask)
    expected = kl_rows(p.reshape(-1, 7), q.reshape(-1, 7)).reshape(3, 4) * mask
    assert torch.allclose(terms, expected, atol=1e-6)


def test_token_kl_terms_skip_impossible_tokens_without_nan_gradients():
    """A token both models rule out (the tabular policy's -inf logits) adds nothing, to the value or
    to the gradient."""
    logits = torch.tensor([[[0.5, -1.0, float("-inf")]]], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([[[0.0, 0.0, float("-inf")]]]), -1)
    terms = token_kl_terms(torch.log_softmax(logits, -1), ref, torch.ones(1, 1))
    expected = kl_rows(torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 0.0]]))
    assert torch.allclose(terms.detach().flatten(), expected)
    terms.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_sampling_passes_the_cache_under_the_name_the_model_takes():
    """transformers 5.24 renamed forward's ``past_key_values`` to ``cache``; the old name warns,
    and goes in 5.40. Models of either kind sample the same tokens, with no warning."""
    import warnings

    from dpo_bench.generation import cache_keyword

    model = _model(2)

    class OldNames(torch.nn.Module):  # the forward of transformers before 5.24
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, **{cache_keyword(self.inner): past_key_values})
            cache = getattr(out, "cache", None)
            return type("Out", (), {"logits": out.logits, "past_key_values": cache if cache is not None else out.past_key_values})

    old = OldNames()
    assert cache_keyword(old) == "past_key_values"
    assert cache_keyword(TabularLM(4, torch.ones(4, 4))) == "cache"
    kwargs = dict(max_new_tokens=8, eos_id=None, pad_id=0, temperature=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new = sample(model, [[1, 4, 5], [2]], generator=torch.Generator(), **kwargs)
    assert sample(old, [[1, 4, 5], [2]], generator=torch.Generator(), **kwargs).completion_ids == new.completion_ids
