"""EAGLE-2 dynamic draft tree: grow by cumulative log-prob, rerank, mask, positions.

Legend: B batch rows, k top-k per expansion, K tree nodes (``total_tokens``,
root included), C candidates, V vocab, D hidden.

Reference: Li et al., "EAGLE-2: Faster Inference of Language Models with
Dynamic Draft Trees" (2024). Each round:

1. The root is the last verified token. The draft's hidden state for the root
   gives log-probs for depth-1 candidates; keep the top-k (the frontier).
2. For ``depth - 1`` steps, run the draft once over the k frontier nodes (tree
   attention: each node sees the committed prefix and its own ancestors),
   score every child by *cumulative* log-prob (parent score + child log-prob),
   record all k*k children as candidates and keep the top-k as the new frontier.
3. Rerank every candidate by score and keep the best ``K - 1``; sort them by
   generation order so parents precede children; node 0 is the root.

A child's score never exceeds its parent's (log-probs are <= 0); ties are
broken towards the shallower node, so a kept node's parent is always kept.
The draft therefore runs ``depth`` times per round counting the catch-up
forward that produced the root's hidden state (see engine.py).

Confidence bounds (both off at 0, the paper's fixed tree). A node's draft
path probability ``exp(score)`` estimates how likely the target accepts it,
so a node far below a bound is mostly wasted verify work, and a draft step
whose best frontier node is below one mostly wasted draft work:

* ``depth_min_prob``: a row stops growing once none of its frontier nodes
  reaches it, and the draft stops once no row grows (fewer draft forwards
  on rounds the draft is unsure about);
* ``node_min_prob``: a row keeps only nodes that reach it (at least the
  root).

Both are decided per row: a row's tree is the same whatever its neighbours
(a batch verifies as many nodes as its largest tree; the other rows' extra
nodes are marked invalid in `Tree.valid` and can never be accepted), so a
seeded sampled row draws the same random numbers alone or in any batch.
Either way the target still verifies what is proposed: outputs are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Tree:
    """A batch of draft trees, one per row, all with K nodes; node 0 is the root."""

    tokens: torch.Tensor  # [B, K] token id of each node
    parents: torch.Tensor  # [B, K] parent node index (the root is its own parent)
    depth: torch.Tensor  # [B, K] 0 for the root
    ancestors: torch.Tensor  # [B, K, K] bool: ancestors[b, i, j] iff j is i or an ancestor of i
    levels: int = 0  # depth levels the draft proposed (`propose_tree`): levels - 1 draft forwards
    valid: torch.Tensor | None = None  # [B, K] bool: nodes of the row's own tree (None: all)

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def select(self, rows: list[int]) -> Tree:
        """The trees of batch rows ``rows``."""
        valid = None if self.valid is None else self.valid[rows]
        return Tree(self.tokens[rows], self.parents[rows], self.depth[rows], self.ancestors[rows], self.levels, valid)


def max_candidates(top_k: int, depth: int) -> int:
    """Candidates one round produces: k at depth 1, then k*k per further step."""
    return top_k + (depth - 1) * top_k * top_k


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """``[B, K]`` parents (root = own parent) -> ``[B, K, K]`` bool self-or-ancestor mask."""
    B, K = parents.shape
    anc = torch.eye(K, dtype=torch.bool, device=parents.device).expand(B, K, K).clone()
    cur = torch.arange(K, device=parents.device).expand(B, K)
    for _ in range(max_depth):
        cur = parents.gather(1, cur)  # [B, K] walk one level up
        anc.scatter_(2, cur[..., None], True)
    return anc


def select_tree(
    root: torch.Tensor,  # [B]
    cand_tokens: torch.Tensor,  # [B, C] in generation order
    cand_scores: torch.Tensor,  # [B, C] cumulative log-probs
    cand_parents: torch.Tensor,  # [B, C] candidate index of the parent, -1 for the root
    cand_depth: torch.Tensor,  # [B, C] >= 1
    total_tokens: int,
    node_min_prob: float = 0.0,
) -> Tree:
    """Keep each row's best ``total_tokens - 1`` candidates (only those reaching ``node_min_prob``, at least
    one; never a ``-inf`` one: a row that stopped growing) and build the tree tensors. Rows with fewer nodes
    than the batch's largest tree get invalid filler nodes (`Tree.valid`)."""
    B, C = cand_tokens.shape
    n_max = min(total_tokens - 1, C)
    floor = math.log(node_min_prob) if node_min_prob > 0 else -math.inf
    own = ((cand_scores > -math.inf) & (cand_scores >= floor)).sum(1).clamp(1, n_max)  # [B] each row's nodes
    n = int(own.max()) if node_min_prob > 0 else n_max
    # float64 key with a depth tie-break: a parent always outranks its children.
    key = cand_scores.double() - cand_depth.double() * 1e-9  # [B, C]
    top = key.topk(n, dim=1).indices  # [B, n] best first
    ranked_ok = torch.arange(n, device=root.device)[None, :] < own[:, None]  # [B, n] within the row's own tree
    keep, order = top.sort(dim=1)  # [B, n] generation order
    node_ok = ranked_ok.gather(1, order)
    node_of = torch.zeros(B, C, dtype=torch.long, device=root.device)  # candidate -> node index
    node_of.scatter_(1, keep, torch.arange(1, n + 1, device=root.device).expand(B, n))
    cp = cand_parents.gather(1, keep)  # [B, n]
    parents = torch.where(cp < 0, 0, node_of.gather(1, cp.clamp(min=0)))  # [B, n]
    zero = torch.zeros(B, 1, dtype=torch.long, device=root.device)
    parents = torch.cat([zero, parents], dim=1)  # [B, K]
    depth = torch.cat([zero, cand_depth.gather(1, keep)], dim=1)  # [B, K]
    tokens = torch.cat([root[:, None], cand_tokens.gather(1, keep)], dim=1)  # [B, K]
    valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=root.device), node_ok], dim=1)  # [B, K]
    return Tree(tokens, parents, depth, ancestor_mask(parents, int(depth.max())), valid=valid)


@torch.no_grad()
def propose_tree(
    draft,
    cache,
    root: torch.Tensor,  # [B] last verified token
    root_hidden: torch.Tensor,  # [B, D] draft hidden whose LM head predicts the root's child
    root_pos: torch.Tensor,  # [B] target position of the root token
    top_k: int,
    depth: int,
    total_tokens: int,
    suppress: torch.Tensor | None = None,  # [S] token ids never proposed, or a [V] additive bias
    rope=None,  # the draft's decoder.RotaryTable
    depth_min_prob: float = 0.0,
    node_min_prob: float = 0.0,
) -> Tree:
    """Grow the EAGLE-2 tree with ``draft`` over its `SlotKVCache` (nothing committed).

    Runs at most ``depth - 1`` draft forwards; fewer under ``depth_min_prob`` (module docstring).
    """
    B, D = root_hidden.shape
    k = top_k
    dev = root.device
    eye = torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)  # [B, k, k] a frontier node sees itself
    score, tok = draft.log_probs(root_hidden, suppress).topk(k, dim=-1)  # [B, k]
    cand_tok, cand_score = [tok], [score]
    cand_parent = [torch.full((B, k), -1, dtype=torch.long, device=dev)]
    front_tok, front_score = tok, score  # [B, k]
    front_idx = torch.arange(k, device=dev).expand(B, k)  # [B, k] candidate index of each frontier node
    front_hidden = root_hidden[:, None, :].expand(B, k, D)  # [B, k, D] parent hidden per frontier node
    anc = eye  # [B, k, s*k] which written entries each frontier node sees
    entry_pos = (root_pos - 1)[:, None]  # [B, 1] the root's own draft entry position
    n_cand = k
    stop = math.log(depth_min_prob) if depth_min_prob > 0 else None
    for s in range(1, depth):
        if stop is not None:
            growing = front_score.max(-1).values >= stop  # [B] rows whose best frontier node is likely enough
            if not bool(growing.any()):
                break
            front_score = torch.where(growing[:, None], front_score, -math.inf)  # stopped rows add no more nodes
        mask = cache.begin(k, anc, offset=(s - 1) * k)  # [B, 1, k, V']
        pos = (entry_pos + s).expand(B, k)  # [B, k] entry of a depth-s node
        g = draft(draft.embed(front_tok), front_hidden, pos, mask, cache, rope)  # [B, k, D]
        child_score, child_tok = draft.log_probs(g, suppress).topk(k, dim=-1)  # [B, k, k]
        flat_score = (front_score[:, :, None] + child_score).reshape(B, k * k)
        flat_tok = child_tok.reshape(B, k * k)
        cand_tok.append(flat_tok)
        cand_score.append(flat_score)
        cand_parent.append(front_idx.repeat_interleave(k, dim=1))
        front_score, best = flat_score.topk(k, dim=-1)  # [B, k]
        slot = best // k  # [B, k] which current frontier node is the parent
        front_tok = flat_tok.gather(1, best)
        front_idx = n_cand + best
        front_hidden = g.gather(1, slot[..., None].expand(B, k, D))
        seen = anc.gather(1, slot[..., None].expand(B, k, anc.shape[2]))  # [B, k, s*k]
        anc = torch.cat([seen, eye], dim=2)  # [B, k, (s+1)*k]
        n_cand += k * k
    grown = len(cand_tok)  # depth levels proposed
    per_depth = torch.tensor([k] + [k * k] * (grown - 1), device=dev)
    cand_depth = torch.arange(1, grown + 1, device=dev).repeat_interleave(per_depth).expand(B, n_cand)  # [B, C]
    tree = select_tree(
        root,
        torch.cat(cand_tok, 1),
        torch.cat(cand_score, 1),
        torch.cat(cand_parent, 1),
        cand_depth,
        total_tokens,
        node_min_prob,
    )
    tree.levels = grown
    return tree
