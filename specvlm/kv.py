"""The decode loop's KV cache: preallocated buffers, per-row lengths, in-place commit.

Legend: L layers, B batch rows, H kv heads, S cache slots, D head dim,
Q tokens written by one forward, A accepted tree nodes.

One `SlotKVCache` serves the target (all its layers) and the draft (one layer).
Every row owns slots ``[0, lengths[b])`` of committed tokens. A forward writes
its Q new tokens at ``lengths[b] + offset + arange(Q)`` ("pending" slots) and
attends to the committed prefix plus whatever pending slots the caller's
tree mask allows. Pending slots are never committed implicitly:

* `advance(n)` keeps the first ``n[b]`` pending slots as they are (prefill,
  draft catch-up, autoregressive steps);
* `commit(path, n)` moves the accepted tree nodes ``path[b, :n[b]]`` to the
  front of the pending region with one gather + one scatter per layer, the
  in-place "accept a tree path" step of speculative decoding. Nothing is
  re-run through the model.

Slots are physical; the rotary position of a token was applied to its key
when written, so rows may sit at different lengths and a row's left padding
is simply a slot marked invalid. `valid` excludes those pad slots.

A pool of rows (continuous batching): rows ``[0, rows)`` are live and
contiguous. `append_rows` adds rows at the end (growing the buffers when
they run out of rows or slots), a forward runs over a window of rows
(`set_window`: the newly added rows for their prefill, all live rows for a
round), and `keep_rows` drops finished rows by moving the last live rows into
their places (one row copy per hole, not a compaction of the whole pool).

The class subclasses HF's `Cache` so HF decoder layers call `update()` on it;
masks are always passed as explicit 4D additive masks built by
`attention_mask()`, so no HF mask logic ever reads this cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotKVCache(Cache):
    """Preallocated ``[L, B, H, S, D]`` keys/values with per-row committed lengths."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        layer_offset: int = 0,
    ):
        # HF's Cache keeps a list of layer objects; we manage storage ourselves.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, H, S, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, H, S, D]
        self._lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self._host = [0] * batch_size  # the same lengths on the host: sizing a forward's mask reads no device value
        self._valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)  # [B, S]
        self.max_len = max_len
        self.rows = batch_size  # live rows [0, rows)
        self._win = (0, batch_size)  # the rows a forward runs over
        self._arange = torch.arange(max_len, device=device)  # [S]
        self.layer_offset = layer_offset  # HF layer_idx of our layer 0 (the draft's layer is idx 0)
        self._slots: torch.Tensor | None = None  # [B, Q] slots of the pending forward
        self._view_len = 0

    # ------------------------------------------------------------------- rows
    @property
    def lengths(self) -> torch.Tensor:
        """``[W]`` committed slots of the window's rows (a view: in-place updates write through)."""
        return self._lengths[self._win[0] : self._win[1]]

    @property
    def host_lengths(self) -> list[int]:
        """The window's committed slots, as `lengths` holds them, kept on the host."""
        return self._host[self._win[0] : self._win[1]]

    @property
    def valid(self) -> torch.Tensor:
        """``[W, S]`` non-padding slots of the window's rows (a view)."""
        return self._valid[self._win[0] : self._win[1]]

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Set the window's committed slots (``[W]``) on the device and the host alike."""
        self.lengths.copy_(lengths)
        a, b = self._win
        self._host[a:b] = self.lengths.tolist()

    def set_window(self, start: int = 0, stop: int | None = None) -> None:
        """Run the next forwards over rows ``[start, stop)`` (default: every live row)."""
        stop = self.rows if stop is None else stop
        assert 0 <= start <= stop <= self.rows, (start, stop, self.rows)
        self._win = (start, stop)

    def append_rows(self, n: int, max_len: int) -> int:
        """Add ``n`` empty rows (length 0, every slot valid) that need up to ``max_len`` slots; returns the
        first one's index. Buffers grow (doubling rows, at least ``max_len`` slots) when they are too small."""
        L, cap, H, S, D = self.keys.shape
        need = self.rows + n
        if need > cap or max_len > S:
            cap2, S2 = max(need, 2 * cap if need > cap else cap), max(S, max_len)
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros(L, cap2, H, S2, D)
                new[:, : self.rows, :, :S] = old[:, : self.rows]
                setattr(self, name, new)
            lengths = self._lengths.new_zeros(cap2)
            lengths[: self.rows] = self._lengths[: self.rows]
            valid = self._valid.new_ones(cap2, S2)
            valid[: self.rows, :S] = self._valid[: self.rows]
            self._lengths, self._valid, self.max_len = lengths, valid, S2
            self._arange = torch.arange(S2, device=lengths.device)
        start = self.rows
        self._lengths[start:need] = 0
        self._host[start:] = [0] * n
        self._valid[start:need] = True
        self.rows = need
        self.set_window()
        return start

    def keep_rows(self, keep: list[int]) -> list[int]:
        """Keep live rows ``keep`` (ascending indices) and drop the others; returns the old index of each
        row at its new place ``[0, len(keep))``. A dropped row's place takes the last kept row beyond it."""
        n = len(keep)
        order = list(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [r for r in keep if r >= n]
        if holes:
            src, dst = (
                torch.tensor(movers, device=self._lengths.device),
                torch.tensor(holes, device=self._lengths.device),
            )
            self.keys[:, dst] = self.keys[:, src]
            self.values[:, dst] = self.values[:, src]
            self._lengths[dst] = self._lengths[src]
            self._valid[dst] = self._valid[src]
            order = list(range(n))
            for h, m in zip(holes, movers):
                order[h] = m
        self._host = [self._host[i] for i in order]
        self.rows = n
        self.set_window()
        return order

    # ------------------------------------------------------------------ write
    def begin(self, q: int, tree_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Reserve ``q`` pending slots per row and return the 4D additive mask.

        Args:
            q: tokens the next forward writes per row.
            tree_mask: ``[B, Q, offset + Q]`` bool; which pending tokens (earlier
                writes of this round first, then this write) each query sees.
            offset: pending slots already written this round (draft tree steps).
        Returns:
            ``[B, 1, Q, V]`` additive float mask over the cache view of V slots.
        """
        # every draft tree level calls this for a handful of tokens: written in few tensor ops
        lengths = self.lengths.unsqueeze(1)  # [B, 1]
        B = lengths.shape[0]
        P = offset + q
        assert tree_mask.shape == (B, q, P), (tree_mask.shape, (B, q, P))
        pending = lengths + self._arange[:P]  # [B, P] slots of this round's writes
        self._slots = pending.narrow(1, offset, q)  # [B, Q]
        view = max(self.host_lengths, default=0) + P
        if view > self.max_len:
            raise RuntimeError(f"KV cache overflow: need {view} slots, have {self.max_len}")
        self._view_len = view
        prefix = (self._arange[:view] < lengths).logical_and_(self.valid[:, :view])  # [B, V]
        visible = prefix.unsqueeze(1).expand(B, q, view).clone()  # [B, Q, V]; pending columns are False here
        visible.scatter_(2, pending.unsqueeze(1).expand(B, q, P), tree_mask)
        # [B, 1, Q, V]: 0 where visible, the dtype's min elsewhere
        return visible.logical_not_().unsqueeze(1).to(self.keys.dtype).mul_(torch.finfo(self.keys.dtype).min)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """HF hook: write ``[B, H, Q, D]`` at the pending slots, return the ``[B, H, V, D]`` view."""
        layer = layer_idx - self.layer_offset
        B, H, Q, D = key_states.shape
        assert self._slots is not None and self._slots.shape == (B, Q), "call begin() before a forward"
        idx = self._slots.view(B, 1, Q, 1).expand(B, H, Q, D)
        a, b = self._win
        keys, values = self.keys[layer, a:b], self.values[layer, a:b]  # [W, H, S, D] views
        if key_states.dtype != keys.dtype:
            key_states, value_states = key_states.to(keys.dtype), value_states.to(keys.dtype)
        keys.scatter_(2, idx, key_states)
        values.scatter_(2, idx, value_states)
        v = self._view_len
        return keys.narrow(2, 0, v), values.narrow(2, 0, v)

    # ----------------------------------------------------------------- commit
    def _count(self, n: torch.Tensor | int, n_host: list[int] | None) -> None:
        """Add ``n`` (``[B]``, or one count for every row) to the window's host lengths: ``n_host`` is the
        caller's host copy of a tensor ``n``; without one, ``n`` is read back (a device-to-host sync)."""
        a, b = self._win
        if isinstance(n, int):
            n_host = [n] * (b - a)
        elif n_host is None:
            n_host = n.tolist()
        self._host[a:b] = [x + y for x, y in zip(self._host[a:b], n_host)]

    def advance(self, n: torch.Tensor | int, n_host: list[int] | None = None) -> None:
        """Keep the first ``n[b]`` pending slots of each row as written. n: ``[B]``, or one count for every
        row; n_host: see `_count`."""
        self.lengths.add_(n)
        self._count(n, n_host)

    def commit(self, path: torch.Tensor, n: torch.Tensor, n_host: list[int] | None = None) -> None:
        """Keep accepted tree nodes: pending node ``path[b, a]`` moves to pending slot ``a``.

        path: ``[B, A]`` node indices relative to the pending region, ascending per
        row (a tree path: parents precede children, so ``path[b, a] >= a``);
        entries at ``a >= n[b]`` are ignored. n: ``[B]`` accepted nodes per row; n_host: see `_count`.
        """
        B, A = path.shape
        L, _, H, _, D = self.keys.shape
        a, b = self._win
        keys, values = self.keys[:, a:b], self.values[:, a:b]  # [L, W, H, S, D] views
        src = self.lengths[:, None] + path  # [B, A]
        dst = self.lengths[:, None] + torch.arange(A, device=path.device)  # [B, A]
        keep = torch.arange(A, device=path.device)[None, :] < n[:, None]  # [B, A]
        src = torch.where(keep, src, dst)  # ignored entries copy onto themselves
        src_idx = src[None, :, None, :, None].expand(L, B, H, A, D)
        dst_idx = dst[None, :, None, :, None].expand(L, B, H, A, D)
        keys.scatter_(3, dst_idx, keys.gather(3, src_idx))
        values.scatter_(3, dst_idx, values.gather(3, src_idx))
        self.lengths.add_(n)
        self._count(n, n_host)

    # HF Cache API bits that generic code may ask for.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.host_lengths, default=0)

    def __len__(self) -> int:
        return self.keys.shape[0]
