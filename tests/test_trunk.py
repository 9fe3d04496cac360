"""dpo_engine.trunk: GPT-2's last hidden states at selected positions equal its own forward's, values
and gradients, for any padding and any packing of the sequences into rows; models it does not
reproduce are refused, and the callers (log-probs, PPO's values, the reward model) give the numbers
of the model's own forward. The packing is checked on its own."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

from dpo_engine.trunk import Packing, last_hidden_at, pack_rows, position_ids, selects_positions, shared_prefixes


def _gpt2(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1,
                  pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(GPT2Config(**{**config, **overrides}))


def _reference_hidden(model, ids, mask):
    """The last hidden state from transformers' own forward, (B, T, D)."""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True,
                 use_cache=False).hidden_states[-1]


def _batch(seed, rows, width, left, symbols=28):
    """Random ids; each row a random length of real tokens, padded on the left or the right. Few
    ``symbols`` make sequences that share prefixes, or are equal."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 2 + symbols, (rows, width), generator=g)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    if left:
        mask = mask.flip(-1)
    return ids.masked_fill(mask == 0, 0), mask


@given(seed=st.integers(0, 10**6), layers=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]), rows=st.integers(1, 6),
       width=st.integers(1, 12), left=st.booleans(), activation=st.sampled_from(["gelu_pytorch_tanh", "gelu_new", "relu"]),
       scaled=st.booleans(), pack_width=st.sampled_from([1, 5, 32]), symbols=st.sampled_from([2, 28]))
@settings(max_examples=60, deadline=None)
def test_last_hidden_at_equals_the_models_forward_in_value_and_gradient(seed, layers, heads, rows, width, left, activation, scaled,
                                                                        pack_width, symbols):
    """``pack_width`` 1 gives a row per sequence; 5 packs short sequences together, up to several rows.
    Two ``symbols`` make most sequences share a prefix with another, and some of them equal."""
    model = _gpt2(seed, n_layer=layers, n_head=heads, activation_function=activation, scale_attn_weights=scaled).train()
    assert selects_positions(model)
    ids, mask = _batch(seed, rows, width, left, symbols)
    g = torch.Generator().manual_seed(seed + 1)
    keep = mask.bool() & (torch.rand(ids.shape, generator=g) < 0.5)
    weights = torch.randn(int(keep.sum()), model.config.n_embd, generator=g)

    with mock.patch("dpo_engine.trunk.PACK_WIDTH", pack_width):
        ours = last_hidden_at(model, ids, mask, keep)
    (ours * weights).sum().backward()
    our_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    theirs = _reference_hidden(model, ids, mask)[keep]
    (theirs * weights).sum().backward()

    assert ours.shape == theirs.shape == (int(keep.sum()), model.config.n_embd)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for mine, reference in zip(our_grads, (p.grad for p in model.parameters())):
        # float32 sums over a batch err in proportion to the gradient's scale (up to ~200 without
        # attention scaling), not to each element: checked against float64, both sides err alike.
        torch.testing.assert_close(mine, reference, atol=1e-5 + 1e-6 * float(reference.abs().max()), rtol=1e-4)


def test_a_row_of_padding_alone_changes_nothing_for_the_others():
    model = _gpt2(4).eval()
    ids, mask = _batch(4, 5, 8, left=False)
    mask[2] = 0
    keep = mask.bool()
    expected = _reference_hidden(model, ids, mask)[keep]
    with mock.patch("dpo_engine.trunk.PACK_WIDTH", 8):
        torch.testing.assert_close(last_hidden_at(model, ids, mask, keep), expected, atol=1e-5, rtol=1e-5)
    assert last_hidden_at(model, ids, torch.zeros_like(mask), torch.zeros_like(keep)).shape == (0, model.config.n_embd)


@given(lengths=st.lists(st.integers(0, 12), max_size=40), extra=st.integers(0, 20))
def test_pack_rows_puts_each_sequence_whole_in_one_row_and_none_overlap(lengths, extra):
    width = max(lengths, default=0) + extra
    if width == 0:
        width = 1
    start, rows = pack_rows(lengths, width)
    taken = set()
    for first, n in zip(start, lengths):
        slots = set(range(first, first + n))
        assert all(slot // width == first // width for slot in slots)  # one row
        assert not slots & taken
        taken |= slots
    assert max((s // width for s, n in zip(start, lengths) if n), default=-1) < rows
    # A new row opens only when no row has room: any two rows hold more than a row's width.
    used = [0] * rows
    for first, n in zip(start, lengths):
        if n:
            used[first // width] += n
    assert all(a + b > width for i, a in enumerate(used) for b in used[i + 1:])
    assert pack_rows(lengths, width) == (start, rows)  # deterministic


def test_pack_rows_takes_the_longest_first_into_the_fullest_row_it_fits():
    # 18 opens row 0 (14 free) and 14 fills it; 9 opens row 1, and 9, 7, 7 fill it; 4 opens row 2.
    assert pack_rows([7, 9, 18, 4, 14, 9, 7], 32) == ([32 + 18, 32 + 0, 0, 2 * 32, 18, 32 + 9, 32 + 25], 3)
    # Best fit: 5 goes to the row with 6 free (13 + 13), not to the first row with room (22, 10 free).
    assert pack_rows([22, 13, 13, 5], 32) == ([0, 32, 32 + 13, 32 + 26], 2)


def _stands_for(sequences):
    """shared_prefixes on a list of token lists."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()]) if len(ids) else ids
    sequence_of = torch.arange(len(sequences)).repeat_interleave(lengths)
    return shared_prefixes(ids, positions, sequence_of, lengths).tolist()


def test_shared_prefixes_on_a_worked_example():
    # The DPO pair (5 1 | 7) and (5 1 | 8) shares its prompt; (5 1 7) again is the first sequence
    # whole; (9) shares nothing; (5) is the first sequence's first token.
    sequences = [[5, 1, 7], [5, 1, 8], [9], [5, 1, 7], [5]]
    #                tokens:  0 1 2      3 4 5      6      7 8 9      10
    assert _stands_for(sequences) == [0, 1, 2, 0, 1, 5, 6, 0, 1, 2, 0]
    assert _stands_for([[3], [], [3, 4]]) == [0, 0, 2]  # an empty sequence takes no token
    assert _stands_for([]) == [] and _stands_for([[], []]) == []


@given(st.lists(st.lists(st.integers(0, 2), max_size=6), max_size=12))
def test_shared_prefixes_stand_for_the_first_sequence_with_the_same_prefix(sequences):
    where = [(i, t) for i, s in enumerate(sequences) for t in range(len(s))]
    stands_for = _stands_for(sequences)
    assert len(stands_for) == len(where)
    for n, (i, t) in enumerate(where):
        j, u = where[stands_for[n]]
        assert u == t and sequences[j][:t + 1] == sequences[i][:t + 1]
        assert j == min(k for k, s in enumerate(sequences) if s[:t + 1] == sequences[i][:t + 1])
    # As many tokens are computed as there are distinct prefixes.
    assert sum(stands_for[n] == n for n in range(len(where))) == len({tuple(sequences[i][:t + 1]) for i, t in where})


def test_shared_prefixes_change_nothing_but_the_work():
    """DPO's pairs share their prompts: the same hidden states and gradients with the sharing off."""
    model = _gpt2(5).train()
    ids, mask = _batch(5, 4, 9, left=True, symbols=3)
    ids, mask = torch.cat([ids, ids]), torch.cat([mask, mask])  # chosen and rejected alike up to their last token
    ids[4:, -1] = (ids[4:, -1] + 1 - 2) % 3 + 2
    keep = mask.bool()
    packing = Packing(keep, ids)
    assert not packing.shares_nothing and len(packing.unique) < int(keep.sum())
    weights = torch.randn(int(keep.sum()), model.config.n_embd, generator=torch.Generator().manual_seed(5))
    results = []
    for share in (True, False):
        model.zero_grad()
        with mock.patch("dpo_engine.trunk.SHARE_PREFIXES", share):
            out = last_hidden_at(model, ids, mask, keep)
        (out * weights).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (shared, shared_grads), (alone, alone_grads) = results
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, alone_grads):
        torch.testing.assert_close(a, b, atol=1e-5 + 1e-6 * float(b.abs().max()), rtol=1e-4)


def test_last_hidden_at_takes_the_body_as_well_as_the_lm():
    model = _gpt2(3).eval()
    ids, mask = _batch(3, 4, 7, left=False)
    keep = mask.bool()
    assert selects_positions(model.transformer)
    torch.testing.assert_close(last_hidden_at(model.transformer, ids, mask, keep), last_hidden_at(model, ids, mask, keep))


def test_keeping_padding_or_a_misshapen_mask_is_an_error():
    model = _gpt2().eval()
    ids, mask = _batch(0, 3, 6, left=True)
    with pytest.raises(ValueError, match="padding"):
        last_hidden_at(model, ids, mask, torch.ones_like(mask, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        last_hidden_at(model, ids, mask, mask.bool()[:, 1:])


def test_models_it_does_not_reproduce_use_their_own_forward():
    from dpo_bench.policy import TabularLM, enable_gradient_checkpointing

    dropout = _gpt2(resid_pdrop=0.1)
    assert not selects_positions(dropout.train())
    assert selects_positions(dropout.eval())  # dropout is off in eval mode
    for unsupported in (dict(scale_attn_by_inverse_layer_idx=True), dict(reorder_and_upcast_attn=True)):
        assert not selects_positions(_gpt2(**unsupported))
    checkpointed = enable_gradient_checkpointing(_gpt2().train())
    assert not selects_positions(checkpointed)
    assert not selects_positions(checkpointed.transformer)  # the body alone, as the reward model holds it
    (getattr(checkpointed, "activation_checkpointing_disable", None) or checkpointed.gradient_checkpointing_disable)()
    assert selects_positions(checkpointed)
    assert not selects_positions(TabularLM(5, torch.tensor([False, False, True, True, True]), torch.zeros(5, 5)))
    adapted = _gpt2()  # an adapter around the last QKV projection, as LoRA puts there: its weight alone is not the layer
    adapted.transformer.h[-1].attn.c_attn = torch.nn.Sequential(adapted.transformer.h[-1].attn.c_attn)
    assert not selects_positions(adapted)
    assert not selects_positions(torch.nn.Linear(2, 2))


def test_log_probs_and_ppo_values_match_the_models_own_forward():
    """The callers: completion log-probs and PPO's values on the trunk path equal those from the
    full forward with the full vocabulary projection, at every completion position."""
    from dpo_bench.logprobs import collate, gather_token_logps, token_logps_and_hidden
    from dpo_bench.methods.ppo import PolicyWithValueHead

    g = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(2, 30, (int(n),), generator=g).tolist() for n in torch.randint(1, 5, (7,), generator=g)]
    completions = [torch.randint(2, 30, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (7,), generator=g)]
    batch = collate(prompts, completions, pad_id=0)
    mask = batch.completion_mask[:, 1:].bool()
    policy = PolicyWithValueHead(_gpt2(5).eval())
    torch.nn.init.normal_(policy.value_head.weight, generator=g)

    logps, hidden = token_logps_and_hidden(policy.policy, batch, hidden=True)
    logps_v, values = policy.logps_and_values(batch)
    full = _reference_hidden(policy.policy, batch.input_ids, batch.attention_mask)
    expected = gather_token_logps(policy.policy.lm_head(full), batch.input_ids).masked_fill(~mask, 0.0)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps_v, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, full[:, :-1][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[mask], policy.value_head(full[:, :-1]).squeeze(-1)[mask], atol=1e-5, rtol=1e-5)
    assert (values[~mask] == 0).all()


def test_reward_model_scores_match_the_trunks_own_forward():
    from reward.model import RewardModel, last_token_index

    model = RewardModel(_gpt2(7)).eval()
    torch.nn.init.normal_(model.head.weight)
    for left in (False, True):
        ids, mask = _batch(7, 6, 9, left)
        full = _reference_hidden(model.trunk, ids, mask)
        last = full[torch.arange(len(ids)), last_token_index(mask)]
        torch.testing.assert_close(model(ids, mask), model.head(last).squeeze(-1), atol=1e-5, rtol=1e-5)



def _backward_ops(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``t``'s backward runs."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(parent for parent, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_the_backward_adds_repeated_rows_in_a_fixed_order():
    """Completions of one prompt read its hidden states many times. On the CPU the backward of a
    tensor index (``x[index]``, IndexBackward0) adds repeated rows in the order its threads finish,
    and two runs' gradients differed in the last bits; the trunk, and the exact task's table policy,
    pick rows with index_select, whose backward adds them in order."""
    from dpo_bench.policy import TabularLM

    model = _gpt2(7).train()
    ids, mask = _batch(7, 8, 9, left=True, symbols=2)
    out = last_hidden_at(model, ids, mask, mask.bool())
    assert not Packing(mask.bool(), ids).shares_nothing
    assert "IndexBackward0" not in _backward_ops(out) and "IndexSelectBackward0" in _backward_ops(out)
    table = TabularLM(4, torch.ones(4, 4, dtype=torch.bool), torch.randn(4, 4, requires_grad=True))
    assert "IndexBackward0" not in _backward_ops(table(torch.tensor([[0, 1, 1, 1]])).logits)
