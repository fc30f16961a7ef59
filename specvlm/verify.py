"""Acceptance: which drafted tree nodes the target keeps, and the bonus token.

Legend: B batch rows, K tree nodes, V vocab, A = max depth + 1 path slots.

Terms (as in vLLM's rejection sampler):
  * accepted tokens: drafted nodes on the kept root-to-node path;
  * bonus token: the one token sampled from the target at the last accepted
    node (always emitted, so every round emits ``accepted + 1`` tokens);
  * accept length: tokens emitted per target forward.

Greedy (temperature 0): keep the longest path whose every node equals the
target's argmax at its parent. Siblings hold distinct tokens, so at most one
node per depth qualifies and the path is unique.

Sampling: multi-candidate speculative sampling, as in SpecInfer (Miao et
al., 2023, "multi-step speculative sampling") and EAGLE (Li et al., 2024).
At the current node with target distribution ``p`` the children
``c_1..c_m`` are tried in order. The tree's children are *deterministic*
(top-k of the draft, chosen before any random number of this step is
drawn), so the proposal for candidate ``c_i`` is the point mass
``q = delta(c_i)``, not the draft's softmax. Standard speculative sampling
with that proposal accepts ``c_i`` with probability ``min(1, p(c_i)/q(c_i)) =
p(c_i)`` and on rejection continues from the residual
``norm(max(p - q, 0))``, which is ``p`` with ``c_i`` zeroed and renormalised.
Then ``P(emit x) = p(c_1)[x = c_1] + (1 - p(c_1)) p'(x) = p(x)`` for every x,
and by induction over candidates and depths the emitted sequence has exactly
the target's distribution. Using the draft's own probability as ``q`` here
would be wrong: the candidates were not sampled from it. If every child is
rejected the bonus token is drawn from the final residual.
"""

from __future__ import annotations

import torch

from .tree import Tree


def process_logits(
    logits: torch.Tensor,  # [..., V]
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    suppress: torch.Tensor | None = None,  # [S]
) -> torch.Tensor:
    """The target's own sampling distribution, as HF generate builds it.

    Order as in HF: suppress tokens, then temperature, top-k, top-p. Returns
    processed logits (``-inf`` where removed) when ``temperature == 0`` and
    probabilities ``[..., V]`` otherwise.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits.clone()
    if suppress is not None and suppress.numel():
        logits[..., suppress] = float("-inf")
    if temperature == 0:
        return logits
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row from ``[B, V]`` probabilities -> ``[B]``."""
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def greedy_accept(tree: Tree, target_next: torch.Tensor):
    """Longest path matching the target's argmax.

    Args:
        tree: the verified tree.
        target_next: ``[B, K]`` target argmax at every node.
    Returns:
        path ``[B, A]`` node indices (root first; ascending), n_accept ``[B]``
        nodes on the path including the root, bonus ``[B]`` token.
    """
    B, K = tree.tokens.shape
    match = tree.tokens == target_next.gather(1, tree.parents)  # [B, K]
    if tree.valid is not None:
        match &= tree.valid  # filler nodes of a smaller tree are never accepted
    match[:, 0] = True
    ok = ~(tree.ancestors & ~match[:, None, :]).any(-1)  # [B, K] whole path matches
    best = torch.where(ok, tree.depth, -1).argmax(-1)  # [B] deepest matching node
    n_accept = tree.depth.gather(1, best[:, None])[:, 0] + 1  # [B]
    bonus = target_next.gather(1, best[:, None])[:, 0]
    return _path(tree, best), n_accept, bonus


def _path(tree: Tree, best: torch.Tensor) -> torch.Tensor:
    """Root-to-``best`` node indices ``[B, A]`` (ascending, padded with 0)."""
    B, K = tree.tokens.shape
    A = int(tree.depth.max()) + 1
    on_path = tree.ancestors[torch.arange(B, device=best.device), best]  # [B, K]
    idx = torch.where(on_path, torch.arange(K, device=best.device), K).sort(-1).values[:, :A]
    return torch.where(idx == K, 0, idx)


def children_table(parents: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` parents -> ``[B, K, W]`` child node indices per node in node order, -1 padded."""
    B, K = parents.shape
    idx = torch.arange(K, device=parents.device)
    is_child = idx[None, :] > 0  # the root is nobody's child
    earlier = (idx[None, :] < idx[:, None]) & is_child  # [K, K]: j is a non-root node before i
    same = (parents[:, :, None] == parents[:, None, :]) & earlier  # [B, K, K]
    rank = same.sum(-1)  # [B, K] position among earlier siblings
    W = int(rank[:, 1:].max()) + 1 if K > 1 else 1
    table = torch.full((B, K, W + 1), -1, dtype=torch.long, device=parents.device)
    slot = torch.where(is_child, rank, W)  # the root writes into a spare column
    flat = parents * (W + 1) + slot  # [B, K]
    table.view(B, -1).scatter_(1, flat, idx.expand(B, K).clone())
    return table[:, :, :W]


def sample_accept(tree: Tree, probs: torch.Tensor, generator: torch.Generator | None):
    """Multi-candidate speculative sampling over the tree (see module docstring).

    Vectorized over rows: at each depth every row tries its current node's
    children in order, each against its own uniform draw.

    Args:
        tree: the verified tree.
        probs: ``[B, K, V]`` target distribution at every node (`process_logits`).
    Returns:
        as `greedy_accept`.
    """
    B, K, V = probs.shape
    dev = probs.device
    rows = torch.arange(B, device=dev)
    children = children_table(tree.parents)  # [B, K, W]
    if tree.valid is not None:  # filler nodes of a smaller tree are never tried
        children = torch.where(tree.valid.gather(1, children.clamp(min=0).flatten(1)).view_as(children), children, -1)
    node = torch.zeros(B, dtype=torch.long, device=dev)  # [B] current node
    live = torch.ones(B, dtype=torch.bool, device=dev)  # [B] still descending
    residual = probs[:, 0].clone()  # [B, V] distribution at the current node
    for _ in range(int(tree.depth.max())):
        moved = torch.zeros(B, dtype=torch.bool, device=dev)
        for j in range(children.shape[2]):
            child = children[rows, node, j]  # [B]
            trying = live & ~moved & (child >= 0)
            if not trying.any():
                break
            tok = torch.where(trying, tree.tokens[rows, child.clamp(min=0)], 0)  # [B]
            p_tok = residual[rows, tok]  # [B]
            u = torch.rand(B, generator=generator, device=dev, dtype=residual.dtype)
            accept = trying & (u < p_tok)
            reject = trying & ~accept
            moved |= accept
            node = torch.where(accept, child, node)
            # rejected: remove the candidate from the residual and renormalise
            residual[rows[reject], tok[reject]] = 0
            residual[reject] /= residual[reject].sum(-1, keepdim=True)
        # rows that moved continue from the child's own target distribution
        residual = torch.where(moved[:, None], probs[rows, node], residual)
        live &= moved
        if not live.any():
            break
    bonus = torch.multinomial(residual, 1, generator=generator)[:, 0]
    n_accept = tree.depth.gather(1, node[:, None])[:, 0] + 1
    return _path(tree, node), n_accept, bonus
