"""Tree construction, KV commit and acceptance on hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from specvlm.kv import SlotKVCache
from specvlm.tree import Tree, ancestor_mask, select_tree
from specvlm.verify import children_table, greedy_accept, process_logits, sample_accept

T, F = True, False


def _example_tree() -> Tree:
    # depth 1: c0 tok 10 (-0.1), c1 tok 11 (-1.0); depth 2: children of c0: 20 (-0.3), 21 (-0.5); of c1: 22, 23
    return select_tree(
        root=torch.tensor([7]),
        cand_tokens=torch.tensor([[10, 11, 20, 21, 22, 23]]),
        cand_scores=torch.tensor([[-0.1, -1.0, -0.3, -0.5, -1.2, -2.0]]),
        cand_parents=torch.tensor([[-1, -1, 0, 0, 1, 1]]),
        cand_depth=torch.tensor([[1, 1, 2, 2, 2, 2]]),
        total_tokens=4,
    )


def test_select_tree_keeps_best_and_orders_parents_first():
    tree = _example_tree()
    assert torch.equal(tree.tokens, torch.tensor([[7, 10, 20, 21]]))
    assert torch.equal(tree.parents, torch.tensor([[0, 0, 1, 1]]))
    assert torch.equal(tree.depth, torch.tensor([[0, 1, 2, 2]]))
    expected = torch.tensor([[T, F, F, F], [T, T, F, F], [T, T, T, F], [T, T, F, T]])
    assert torch.equal(tree.ancestors[0], expected)


def test_select_tree_node_min_prob_keeps_only_likely_nodes():
    kw = dict(
        root=torch.tensor([7, 8]),
        cand_tokens=torch.tensor([[10, 11, 20, 21, 22, 23], [12, 13, 24, 25, 26, 27]]),
        cand_parents=torch.tensor([[-1, -1, 0, 0, 1, 1]] * 2),
        cand_depth=torch.tensor([[1, 1, 2, 2, 2, 2]] * 2),
        total_tokens=5,
    )
    unsure = torch.tensor([[-2.0, -3.0, -2.5, -4.0, -3.5, -5.0]])  # no candidate reaches p = 0.5
    sure = torch.tensor([[-0.1, -1.0, -0.3, -0.5, -1.2, -2.0]])  # 2 reach exp(-0.4)
    tree = select_tree(cand_scores=torch.cat([sure, sure]), node_min_prob=math.exp(-0.4), **kw)
    assert torch.equal(tree.tokens, torch.tensor([[7, 10, 20], [8, 12, 24]]))
    tree = select_tree(cand_scores=torch.cat([unsure, sure]), node_min_prob=math.exp(-0.4), **kw)
    assert tree.num_nodes == 3  # the batch keeps what its most confident row needs
    assert torch.equal(tree.tokens[0], torch.tensor([7, 10, 20]))  # the unsure row's best two, parents first
    tree = select_tree(cand_scores=torch.cat([unsure, unsure]), node_min_prob=0.5, **kw)
    assert torch.equal(tree.tokens, torch.tensor([[7, 10], [8, 12]]))  # never fewer than one drafted node
    assert select_tree(cand_scores=torch.cat([sure, sure]), node_min_prob=0.0, **kw).num_nodes == 5


def test_select_tree_tie_keeps_the_parent():
    # the child has log-prob 0: same score as its parent; the parent must win the last slot
    tree = select_tree(
        torch.tensor([5]),
        torch.tensor([[9, 8]]),
        torch.tensor([[-0.5, -0.5]]),
        torch.tensor([[-1, 0]]),
        torch.tensor([[1, 2]]),
        total_tokens=2,
    )
    assert torch.equal(tree.tokens, torch.tensor([[5, 9]]))


def test_ancestor_mask_chain():
    anc = ancestor_mask(torch.tensor([[0, 0, 1, 2]]), max_depth=3)
    assert torch.equal(anc[0], torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]).bool())


def test_greedy_accept_longest_matching_path():
    tree = _example_tree()
    tree = Tree(*(torch.cat([x, x]) for x in (tree.tokens, tree.parents, tree.depth, tree.ancestors)))
    target_next = torch.tensor([[10, 21, 5, 7], [99, 0, 0, 0]])  # row 0 follows 7 -> 10 -> 21; row 1 rejects all
    path, n_accept, bonus = greedy_accept(tree, target_next)
    assert torch.equal(n_accept, torch.tensor([3, 1]))
    assert torch.equal(path, torch.tensor([[0, 1, 3], [0, 0, 0]]))
    assert torch.equal(bonus, torch.tensor([7, 99]))


def test_children_table():
    table = children_table(torch.tensor([[0, 0, 0, 1, 1, 2]]))
    assert torch.equal(table[0], torch.tensor([[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]]))


def test_sample_accept_deterministic_cases():
    tree = _example_tree()  # root 7 -> 10 -> {20, 21}
    V = 32
    probs = torch.zeros(1, 4, V, dtype=torch.float64)
    probs[0, 0, 10] = 1.0  # target surely says 10 after the root
    probs[0, 1, 30] = 1.0  # ... then 30, which no candidate holds: both rejected, bonus 30
    path, n, bonus = sample_accept(tree, probs, torch.Generator().manual_seed(0))
    assert n.tolist() == [2] and path[0, :2].tolist() == [0, 1] and bonus.tolist() == [30]


def test_sample_accept_matches_target_distribution():
    """One level: candidates 0 and 1 under p = [.5, .3, .2]; the emitted token must follow p."""
    B, V = 20000, 3
    tree = Tree(
        tokens=torch.tensor([[9, 0, 1]]).expand(B, 3),
        parents=torch.zeros(B, 3, dtype=torch.long),
        depth=torch.tensor([[0, 1, 1]]).expand(B, 3),
        ancestors=torch.tensor([[T, F, F], [T, T, F], [T, F, T]]).expand(B, 3, 3),
    )
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    probs = torch.zeros(B, 3, V, dtype=torch.float64)
    probs[:, 0] = p
    probs[:, 1:] = 1.0 / V
    path, n, bonus = sample_accept(tree, probs, torch.Generator().manual_seed(1))
    first = torch.where(n == 2, tree.tokens.gather(1, path[:, 1:2])[:, 0], bonus)
    counts = torch.bincount(first, minlength=V).double()
    assert chisquare(counts.numpy(), (p * B).numpy()).pvalue > 1e-3


def test_process_logits_matches_hf_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = process_logits(logits, temperature=0.7, top_k=10, top_p=0.8, suppress=torch.tensor([4]))
    ref = logits.clone()
    ref[:, 4] = float("-inf")
    ids = torch.zeros(3, 1, dtype=torch.long)
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        ref = w(ids, ref)
    assert torch.allclose(ours, ref.softmax(-1))
    greedy = process_logits(logits, temperature=0.0, suppress=torch.tensor([4]))
    assert greedy[:, 4].isinf().all() and torch.equal(greedy[:, :4], logits[:, :4])


# ------------------------------------------------------------------- KV cache
def _cache(B=2, S=12):
    return SlotKVCache(1, B, 1, 1, S, torch.float64, "cpu")


def test_kv_mask_prefix_padding_and_tree():
    kv = _cache()
    kv.set_lengths(torch.tensor([2, 3]))
    kv.valid[0, 0] = False  # row 0's first slot is left padding
    mask = kv.begin(2, torch.tensor([[[T, F], [T, T]]]).expand(2, 2, 2))
    seen = mask[:, 0] == 0  # [B, Q, V], V = 3 + 2
    assert seen.shape == (2, 2, 5)
    assert seen[0].tolist() == [[F, T, T, F, F], [F, T, T, T, F]]
    assert seen[1].tolist() == [[T, T, T, T, F], [T, T, T, T, T]]


def test_kv_update_and_commit_gather_accepted_path():
    kv = _cache()
    kv.set_lengths(torch.tensor([1, 2]))
    kv.begin(4, torch.ones(2, 4, 4, dtype=torch.bool))
    new = torch.arange(1, 9, dtype=torch.float64).view(2, 1, 4, 1)  # [B, H, Q, D]: row0 1..4, row1 5..8
    k, v = kv.update(new, -new, 0)
    assert k.shape == (2, 1, 6, 1)
    assert kv.keys[0, 0, 0, 1:5, 0].tolist() == [1, 2, 3, 4]
    assert kv.keys[0, 1, 0, 2:6, 0].tolist() == [5, 6, 7, 8]
    kv.commit(torch.tensor([[0, 2, 3], [0, 3, 0]]), torch.tensor([3, 2]))
    assert kv.lengths.tolist() == kv.host_lengths == [4, 4]
    assert kv.keys[0, 0, 0, 1:4, 0].tolist() == [1, 3, 4]
    assert kv.keys[0, 1, 0, 2:4, 0].tolist() == [5, 8]
    assert kv.values[0, 1, 0, 2:4, 0].tolist() == [-5, -8]


def test_kv_pool_rows_join_leave_and_overflow():
    """Rows leave by the last live rows moving into their places; rows join at the end (buffers grow); a
    window runs a forward over some rows only; the cache refuses to write past its slots."""
    kv = _cache(B=4, S=4)
    kv.set_lengths(torch.tensor([1, 2, 3, 4]))
    kv.keys[:, :, 0, 0, 0] = torch.tensor([10.0, 20.0, 30.0, 40.0])
    order = kv.keep_rows([0, 2, 3])
    assert order == [0, 3, 2] and kv.rows == 3 and kv.host_lengths == [1, 4, 3]  # row 3 moved into row 1's place
    assert kv.lengths.tolist() == [1, 4, 3] and kv.keys[0, :3, 0, 0, 0].tolist() == [10.0, 40.0, 30.0]
    start = kv.append_rows(3, max_len=6)
    assert start == 3 and kv.rows == 6 and kv.max_len == 6 and kv.keys.shape[1] >= 6
    assert kv.lengths.tolist() == [1, 4, 3, 0, 0, 0] and kv.keys[0, :3, 0, 0, 0].tolist() == [10.0, 40.0, 30.0]
    kv.set_window(3, 6)
    assert kv.lengths.shape == (3,)
    kv.advance(1)  # the window's rows only
    kv.set_window()
    assert kv.lengths.tolist() == kv.host_lengths == [1, 4, 3, 1, 1, 1]
    with pytest.raises(RuntimeError, match="overflow"):
        kv.begin(3, torch.ones(6, 3, 3, dtype=torch.bool))
