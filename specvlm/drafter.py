"""The draft's side of decoding: its KV pool, prefill (with compression), tree proposal and catch-up.

Legend: R live rows, N rows joining, T prompt tokens, T' the draft's prompt after compression, A path
slots, K tree nodes, D hidden.

A `Drafter` mirrors the engine's target pool row for row: rows join (`prefill`) at the end and leave
(`keep_rows`) exactly as the target's rows do, so row r of the draft KV is row r of the target KV. Per
live row it holds the draft hidden state whose LM head predicts the child of the row's last verified
token (``hidden``, ``[R, D]``).

Rounds without speculation (the batch-aware policy's ``off``) cost the draft nothing: `follow` only
records each row's new entry (the target's feature and the token after it), and the next `propose`
first catches up on all of them in one draft forward (`sync`).
"""

from __future__ import annotations

import torch

from .config import TreeConfig
from .decoder import RotaryTable
from .draft import EagleDraft
from .kv import SlotKVCache
from .target import Prompt, TargetAdapter
from .tree import Tree, propose_tree


class Drafter:
    """The draft model's decode state for a pool of rows (see module docstring)."""

    def __init__(self, draft: EagleDraft, target: TargetAdapter, compress: bool):
        self.draft, self.target, self.compress = draft, target, compress
        self.kv = SlotKVCache(1, 0, target.num_kv_heads, target.head_dim, 0, target.dtype, target.device)
        self.hidden = torch.zeros(0, target.text_config.hidden_size, dtype=target.dtype, device=target.device)  # [R, D]
        self.suppress = torch.zeros(target.lm_head.out_features, dtype=torch.float32, device=target.device)
        self.suppress[target.placeholder_ids] = float("-inf")  # [V] additive: placeholders are never proposed
        self.rope: RotaryTable = draft.rotary_table(0, target.embed_tokens.weight)  # grown as rows join
        D = target.text_config.hidden_size
        self.lag_tokens = torch.zeros(0, 0, dtype=torch.long, device=target.device)  # [R, L] entries not yet run
        self.lag_feats = torch.zeros(0, 0, D, dtype=target.dtype, device=target.device)  # [R, L, D]
        self.lag: list[int] = []  # per row: entries in the lag buffers (host)

    def prefill(
        self,
        prompt: Prompt,
        input_ids: torch.Tensor,  # [N, T]
        mask: torch.Tensor,  # [N, T] bool, left-padded
        feats: torch.Tensor,  # [N, T, D] the target's features over the prompt
        root: torch.Tensor,  # [N] each joining row's first token
        causal: torch.Tensor,  # [N, T, T] the target's prompt mask
        trees: list[TreeConfig],  # every tree a round may use
        max_new_tokens: int,  # the joining rows' largest budget
        max_pos: int,  # positions the rows can reach
    ) -> tuple[list[int], list[int] | None]:
        """Add the joining rows' draft context at the end of the pool (after the target's prefill).

        Entry i of the draft's prompt reads ``[embed(x_{i+1}); f_i]`` (the root after the last prompt
        token); in ``specvlm`` mode each visual span is compressed first. Returns the visual tokens the
        draft reads per row and the compressor primitive per row (None without compression).
        """
        draft, tgt, dev = self.draft, self.target, input_ids.device
        embeds, positions = prompt.embeds, prompt.positions
        next_ids = torch.cat([input_ids[:, 1:], root[:, None]], dim=1)  # [N, T] token after each entry
        h = draft.project(torch.cat([embeds[:, 1:], draft.embed(root[:, None])], dim=1), feats)  # [N, T, D]
        d_pos, d_valid, d_causal = positions, mask, causal  # the draft's prompt = the target's unless compressed
        span = tgt.is_visual(next_ids)  # [N, T] entries whose next token is visual
        visual, choices = span.sum(1).tolist(), None
        if self.compress:
            comp = draft.compressor.compress(h, positions, mask, span, prompt.layouts, feats, feats[:, -1])
            h, d_pos, d_valid = comp.embeds, comp.positions, comp.valid  # [N, T', D], [(3,) N, T'], [N, T']
            tril = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=dev).tril()  # [T', T']
            d_causal = tril[None] & d_valid[:, None, :]  # [N, T', T']
            visual, choices = comp.visual_tokens.tolist(), comp.choice.tolist()
        N, T2 = h.shape[:2]
        slack = max_new_tokens + max((t.depth - 1) * t.top_k + t.depth for t in trees) + 2  # tree steps + catch-up
        start = self.kv.append_rows(N, T2 + slack)
        self.kv.set_window(start, start + N)
        self.kv.valid[:, :T2] = d_valid
        rope = self.rope = self.rope.covering(max(self.kv.max_len, max_pos))
        g = draft.decode(h, d_pos, self.kv.begin(T2, d_causal), self.kv, rope)  # [N, T', D]
        self.kv.advance(T2)
        self.kv.set_window()
        self.hidden = torch.cat([self.hidden, g[:, -1]])  # [R, D]
        L = self.lag_tokens.shape[1]
        self.lag_tokens = torch.cat([self.lag_tokens, self.lag_tokens.new_zeros(N, L)])  # [R, L]
        self.lag_feats = torch.cat(
            [self.lag_feats, self.lag_feats.new_zeros(N, L, self.lag_feats.shape[2])]
        )  # [R, L, D]
        self.lag += [0] * N
        return visual, choices

    def follow(self, next_tokens: torch.Tensor, feats: torch.Tensor) -> None:
        """A round without speculation: record each live row's new entry (``feats [R, D]``, the target's
        feature at the row's last token, and ``next_tokens [R]``, the token after it) for the next `sync`."""
        R, L = self.lag_tokens.shape
        if max(self.lag, default=0) == L:  # grow the buffers
            self.lag_tokens = torch.cat([self.lag_tokens, self.lag_tokens.new_zeros(R, max(L, 8))], 1)
            self.lag_feats = torch.cat([self.lag_feats, self.lag_feats.new_zeros(R, max(L, 8), feats.shape[-1])], 1)
        rows = torch.arange(R, device=feats.device)
        at = torch.tensor(self.lag, device=feats.device)  # [R] each row's next free lag slot
        self.lag_tokens[rows, at] = next_tokens
        self.lag_feats[rows, at] = feats.to(self.lag_feats.dtype)
        self.lag = [n + 1 for n in self.lag]

    def sync(self, pos: torch.Tensor) -> None:
        """Catch up, in one draft forward, on the entries `follow` recorded (``pos [R]``: each row's next
        position, so its first recorded entry sits at ``pos - lag``)."""
        if not any(self.lag):
            return
        n = torch.tensor(self.lag, device=pos.device)  # 0 for rows that joined since: nothing to catch up on
        L = max(self.lag)
        self.catch_up(self.lag_tokens[:, :L], self.lag_feats[:, :L], n, pos - n, list(self.lag))
        self.lag = [0] * len(self.lag)

    def propose(self, root: torch.Tensor, pos: torch.Tensor, tree: TreeConfig) -> Tree:
        """An EAGLE-2 tree per live row from its last verified token ``root [R]`` at position ``pos [R]``."""
        self.sync(pos)
        return propose_tree(
            self.draft, self.kv, root, self.hidden, pos, tree.top_k, tree.depth, tree.total_tokens,
            self.suppress, self.rope, tree.depth_min_prob, tree.node_min_prob,
        )  # fmt: skip

    def catch_up(self, next_tokens: torch.Tensor, feats: torch.Tensor, n: torch.Tensor, pos: torch.Tensor,
                 n_host: list[int]) -> None:  # fmt: skip
        """Commit each row's first ``n[b]`` new entries: entry a reads ``[embed(next_tokens[b, a]);
        feats[b, a]]`` at position ``pos[b] + a`` (``[R, A]``, ``[R, A, D]``, ``[R]``, ``[R]``; ``n_host``: ``n``
        on the host), one draft forward; ``hidden`` becomes each row's output at its last committed entry
        (unchanged where n is 0)."""
        R, A = next_tokens.shape
        tril = torch.ones(A, A, dtype=torch.bool, device=next_tokens.device).tril().expand(R, A, A)
        cpos = pos[:, None] + torch.arange(A, device=pos.device)  # [R, A]
        d = self.draft
        g = d(d.embed(next_tokens), feats, cpos, self.kv.begin(A, tril), self.kv, self.rope)  # [R, A, D]
        self.kv.advance(n, n_host)
        last = g.gather(1, (n - 1).clamp(min=0)[:, None, None].expand(-1, 1, g.shape[-1]))[:, 0]  # [R, D]
        self.hidden = torch.where((n > 0)[:, None], last, self.hidden)  # a row with nothing new keeps its state

    def keep_rows(self, keep: list[int]) -> None:
        """Drop the rows not in ``keep``, as the target's pool does (`SlotKVCache.keep_rows`)."""
        order = self.kv.keep_rows(keep)
        idx = torch.tensor(order, dtype=torch.long, device=self.hidden.device)  # [R'] old row of each new place
        self.hidden = self.hidden[idx]
        self.lag_tokens, self.lag_feats = self.lag_tokens[idx], self.lag_feats[idx]
        self.lag = [self.lag[i] for i in order]
