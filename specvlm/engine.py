"""`SpecVLMEngine`: batched lossless speculative decoding for HF vision-language models, continuously batched.

Legend: R live rows, N rows joining, T prompt tokens, K tree nodes, A path slots (max depth + 1), D hidden,
V vocab.

The engine knows nothing about tokenization or image preprocessing: it takes
what an HF processor returns. Modes:

* ``ar``: the target alone, one token per forward (the baseline loop).
* ``eagle``: EAGLE-2 draft tree + one target forward per round (`tree.py`,
  `verify.py`); each row accepts its own number of tokens per round.
* ``specvlm``: as ``eagle``, but the draft's prefill and KV hold each image's
  visual span through its `ElasticCompressor` (one primitive per row, chosen
  by the gate); text entries keep the target's positions, so every later
  draft step is unchanged. Only the draft's context shrinks: outputs are the
  target's, token for token.

The stepping core. `add` queues rows (a left-padded batch, each row with its
own `SamplingConfig`: temperature, top-p, top-k, seed, budget, stop ids) at
any time; `step` runs one step for the whole pool and returns what it emitted
(a `TokenEvent`): first a round for the rows already decoding, then the
prefill of the rows added since the last step (they join the next round),
then finished rows leave. Rows sit in one KV pool (`kv.SlotKVCache`: rows
join at the end, leave by the last rows moving into their places), the
draft's mirror of it (`drafter.Drafter`) and per-row host state, so prompts
of any length and images of any size share the running batch. `generate` is
`add` + `step` until done. One round::

    propose   depth-1 draft forwards over the frontier      (drafter, draft KV, not committed)
    verify    one target forward over all K tree nodes      (target KV, pending)
    accept    per row: greedy, or speculative sampling with the row's own generator
    commit    target KV: in-place gather of the accepted path
    catch-up  one draft forward over the accepted path       (drafter, draft KV, committed)

A row's tree, its random draws and so its tokens do not depend on its
neighbours (trees are bounded per row, `tree.py`), so a seeded row samples the
same tokens alone or in any batch, and a greedy row decodes the same tokens
whenever it joins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import EngineConfig, SamplingConfig, TreeConfig
from .draft import EagleDraft
from .drafter import Drafter
from .policy import AutoPolicy, StepCost, TablePolicy
from .target import Prompt, TargetAdapter
from .tree import Tree
from .verify import greedy_accept, process_logits, sample, sample_accept


@dataclass
class RowStats:
    """Counters for one request. accept_length = tokens per decoding-round target forward
    (bonus included; the prefill's first token excluded, as in EAGLE): 1.0 in ``ar`` mode."""

    num_tokens: int = 0
    target_forwards: int = 0  # prefill included
    draft_forwards: int = 0  # draft prefill included
    prefill_ms: float = 0.0  # target + draft prefill
    draft_prefill_ms: float = 0.0  # the draft's share of it (projection, compression, draft layer over the prompt)
    draft_ms: float = 0.0
    verify_ms: float = 0.0  # target forwards after prefill, acceptance and KV commit
    compressor: str = "none"  # specvlm mode: the primitive the gate chose for this row
    draft_visual_tokens: int = 0  # visual tokens in the draft's context (= the target's unless compressed)
    tree_nodes: int = 0  # nodes of the row's own trees over its rounds, roots included (what confidence bounds cut)

    @property
    def accept_length(self) -> float:
        rounds = self.target_forwards - 1
        return (self.num_tokens - 1) / rounds if rounds > 0 else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "accept_length": self.accept_length}


def pooled_accept_length(stats: list[dict]) -> float:
    """Accept length over many requests (`RowStats.to_dict()` each), as vLLM and SGLang report it: tokens
    from decoding rounds / decoding-round target forwards, summed first (a 2-token answer weighs little)."""
    rounds = sum(s["target_forwards"] - 1 for s in stats)
    return sum(s["num_tokens"] - 1 for s in stats) / rounds if rounds > 0 else 1.0


@dataclass
class GenerateOutput:
    sequences: list[list[int]]  # per row: new token ids, EOS included when reached
    stats: list[dict] = field(default_factory=list)  # per row: RowStats.to_dict()


@dataclass
class TokenEvent:
    """What one step emitted (the prefill's first token, then each round), passed to ``generate(on_tokens=)``;
    `SpecVLMEngine.step(on_prefill=)` gets the first tokens in an event of their own."""

    tokens: dict[int, list[int]]  # row id -> ids emitted this step (a stop id included when reached)
    finished: set[int]  # rows that ended this step (a stop id or their max_new_tokens)
    stats: dict[int, dict]  # row id -> RowStats.to_dict() so far, for the rows in `tokens`


OnTokens = Callable[[TokenEvent], Iterable[int] | None]  # `generate`: returns rows (batch indices) to finish now


class _Clock:
    """Wall-clock sections; synchronizes CUDA so times are real."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        ms, self.t = (now - self.t) * 1e3, now
        return ms


def row_seed(seed: int, row: int) -> int:
    """The seed of batch row ``row`` when a whole batch is given one ``seed``: distinct for every (seed, row)
    pair with fewer than 1000003 rows, so two calls with different seeds never share a row's draws."""
    return seed * 1_000_003 + row


@dataclass
class _Row:
    """Host state of one live row (its place in the pool is its index in `SpecVLMEngine._live`)."""

    rid: int
    sampling: SamplingConfig
    stops: frozenset[int]  # the model's EOS ids and the row's stop ids
    generator: torch.Generator | None
    stats: RowStats = field(default_factory=RowStats)
    seq: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class _Group:
    """Rows added together, prefilled together at the next step."""

    rows: list[_Row]
    prompt: Prompt
    input_ids: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, T] bool
    prompt_ms: float


class SpecVLMEngine:
    """Generate with a target VLM, optionally accelerated by an `EagleDraft`.

    Args:
        model: an HF VLM (see `target.SUPPORTED`), used in its own dtype/device.
        draft: the draft for ``eagle`` / ``specvlm`` mode (bound to the target's embedding / LM head here).
        config: `EngineConfig`.
    """

    def __init__(self, model: nn.Module, draft: EagleDraft | None = None, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.target = TargetAdapter(model)
        model.eval()
        mode = self.config.mode
        self.draft = self._bind(draft) if mode != "ar" else draft
        self.policy: TablePolicy | AutoPolicy = TablePolicy(self.config)  # which tree each round uses
        self.reset()
        if self.config.batch_trees == "auto" and mode != "ar":
            costs = self.calibrate(self.config.auto_rows)
            self.policy = AutoPolicy(self.config.tree, costs, self.config.auto_accept_length)

    def reset(self) -> None:
        """Drop every row (live and queued) and free the KV pools."""
        tgt = self.target
        self.kv = tgt.new_cache(0, 0)  # the target's KV pool, row r = self._live[r]
        self.drafter = Drafter(self.draft, tgt, self.config.mode == "specvlm") if self.config.mode != "ar" else None
        self._live: list[_Row] = []
        self._queued: list[_Group] = []
        self._root = torch.zeros(0, dtype=torch.long, device=tgt.device)  # [R] last emitted token
        self._pos = torch.zeros(0, dtype=torch.long, device=tgt.device)  # [R] its position (every M-RoPE axis)
        self._rope = tgt.rotary_table(0)  # grown as rows join (`RotaryTable.covering`)
        self._next_rid = 0

    def _bind(self, draft: EagleDraft | None) -> EagleDraft:
        """Check ``draft`` against the mode and the target, move it to the target's device and dtype, bind it."""
        mode = self.config.mode
        if draft is None:
            raise ValueError(f"mode {mode!r} needs a draft: EagleDraft.from_target(model) or from_pretrained(dir)")
        if mode == "specvlm" and draft.compressor is None:
            raise ValueError(
                "mode 'specvlm' needs a draft with a visual compressor (distilled with `mode: specvlm`); "
                "this draft has none: use mode 'eagle'"
            )
        draft.check_fits(self.target)
        draft.to(device=self.target.device, dtype=self.target.dtype).eval()
        draft.bind(self.target.embed_tokens, self.target.lm_head)
        return draft

    def set_draft(self, draft: EagleDraft) -> None:
        """Decode with ``draft`` from now on (a newer distilled version; the target stays loaded). The engine
        must be idle: a live row's draft state (its KV, its last hidden) belongs to the draft that built it.
        Outputs do not depend on the draft."""
        if self.config.mode == "ar":
            raise ValueError("mode 'ar' decodes without a draft")
        if self._live or self._queued:
            raise RuntimeError("set_draft needs an idle engine (step the rows it holds to the end first)")
        self.draft = self._bind(draft)
        self.reset()

    # ------------------------------------------------------------------ API
    @property
    def num_rows(self) -> int:
        """Rows decoding or queued."""
        return len(self._live) + sum(len(g.rows) for g in self._queued)

    @torch.inference_mode()
    def add(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        sampling: SamplingConfig | list[SamplingConfig] | None = None,
        **mm_kwargs,
    ) -> list[int]:
        """Queue a left-padded batch of prompts; they join the running batch at the next `step`.

        Args:
            input_ids, attention_mask, pixel_values, mm_kwargs: as `generate`.
            sampling: one `SamplingConfig` for every row, or one per row (default: greedy, 128 tokens).
        Returns:
            the rows' ids (as `TokenEvent` names them). Raises ValueError for bad inputs, before any work
            on the running batch.
        """
        B = input_ids.shape[0] if torch.is_tensor(input_ids) and input_ids.dim() == 2 else 0
        settings = sampling if isinstance(sampling, list) else [sampling or SamplingConfig()] * B
        if len(settings) != B:
            raise ValueError(f"{len(settings)} sampling settings for {B} rows")
        input_ids, mask = self._check(input_ids, attention_mask)
        dev = self.target.device
        t0 = time.perf_counter()
        mm_kwargs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in mm_kwargs.items()}
        pv = pixel_values.to(dev) if pixel_values is not None else None
        input_ids, mask = input_ids.to(dev), mask.to(dev).bool()
        prompt = self.target.prompt(input_ids, mask, pv, return_layouts=self.config.mode == "specvlm", **mm_kwargs)
        rows = []
        for s in settings:
            gen = torch.Generator(device=dev).manual_seed(s.seed) if s.seed is not None else None
            rows.append(_Row(self._next_rid, s, frozenset(self.target.eos_token_ids) | set(s.stop_token_ids), gen))
            self._next_rid += 1
        self._queued.append(_Group(rows, prompt, input_ids, mask, (time.perf_counter() - t0) * 1e3))
        return [r.rid for r in rows]

    def finish(self, rids: Iterable[int]) -> None:
        """End rows now (stop strings, cancelled requests): they leave at the next `step`, emitting nothing more."""
        ended = set(rids)
        for row in self._live:
            if row.rid in ended:
                row.done = True
        for g in self._queued:
            for row in g.rows:
                if row.rid in ended:
                    row.done = True

    @torch.inference_mode()
    def step(self, on_prefill: Callable[[TokenEvent], None] | None = None) -> TokenEvent:
        """One step: the prefill of queued rows (each emits its first token), then a round for every decoding
        row, the new ones included; finished rows leave. Prefill first: a new row's first round runs in the
        step of its prefill rather than the next one, so every row spends one step less in the engine and
        frees its place a step sooner.

        ``on_prefill``: called with the prefilled rows' first tokens as soon as the prefill is done, before
        the round (a server streams them at once, so time to first token does not include the round); the
        returned event then holds only the round's tokens. It may `finish` rows, which then skip the round,
        and `add` rows, which are prefilled next (another ``on_prefill`` call) and join this step's round.
        Without it the first tokens come in the returned event, ahead of the round's.
        """
        self._retire()
        emitted: dict[int, list[int]] = {}
        self._prefill_queued(emitted)
        new = [r for r in self._live if r.rid in emitted]
        while on_prefill is not None and new:
            on_prefill(self._event(new, emitted))  # rows it adds are prefilled now too, before the round
            emitted = {}
            self._prefill_queued(emitted)
            new = [r for r in self._live if r.rid in emitted]
        ended = [r for r in new if r.done]  # done at their first token: no round
        self._retire()
        if self._live:
            tree = None if self.drafter is None else self.policy.tree_for(len(self._live))
            if tree is None:
                self._ar_step(emitted)
            else:
                self._spec_round(emitted, tree)
        event = self._event(ended + [r for r in self._live if r.rid in emitted], emitted)
        self._retire()
        return event

    @staticmethod
    def _event(rows: list[_Row], emitted: dict[int, list[int]]) -> TokenEvent:
        """The event of ``rows``, every row that emitted ``emitted[rid]``."""
        return TokenEvent(emitted, {r.rid for r in rows if r.done}, {r.rid: r.stats.to_dict() for r in rows})

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        on_tokens: OnTokens | None = None,
        sampling: list[SamplingConfig] | None = None,
        **mm_kwargs,
    ) -> GenerateOutput:
        """Decode a batch of left-padded prompts to the end (`add`, then `step` until every row is done).

        Args:
            input_ids: ``[B, T]`` prompt ids with image / video placeholders.
            attention_mask: ``[B, T]`` 1 for tokens, 0 for left padding (default: all ones).
            pixel_values: as the model's processor returns them.
            max_new_tokens, temperature, top_p, top_k: HF generate's meaning, for every row.
            seed: makes sampling reproducible (row b samples from its own generator, seeded `row_seed`).
            on_tokens: called after every step (in the calling thread) with a `TokenEvent` keyed by batch
                index; it may return rows (batch indices) to finish now: they leave the batch, their tokens
                so far stay in the output. Rows it does not name decode exactly as without it.
            sampling: per-row settings instead of the ones above.
            mm_kwargs: other processor outputs for the model (``image_sizes``, ``image_grid_thw``, ...).
        """
        if self._live or self._queued:
            raise RuntimeError("generate needs an idle engine (rows were added with add(); step them to the end)")
        if sampling is None:
            self._check_sampling(max_new_tokens, temperature, top_p, top_k)
            B = input_ids.shape[0] if torch.is_tensor(input_ids) and input_ids.dim() == 2 else 0
            sampling = [SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                       seed=None if seed is None else row_seed(seed, b)) for b in range(B)]  # fmt: skip
        rids = self.add(input_ids, attention_mask, pixel_values, sampling, **mm_kwargs)
        index = {rid: b for b, rid in enumerate(rids)}
        seqs: list[list[int]] = [[] for _ in rids]
        stats: list[dict] = [{} for _ in rids]
        try:
            while self._live or self._queued:
                event = self.step()
                for rid, toks in event.tokens.items():
                    seqs[index[rid]] += toks
                    stats[index[rid]] = event.stats[rid]
                if on_tokens is not None and event.tokens:
                    local = TokenEvent({index[r]: t for r, t in event.tokens.items()},
                                       {index[r] for r in event.finished},
                                       {index[r]: s for r, s in event.stats.items()})  # fmt: skip
                    self.finish(rids[b] for b in on_tokens(local) or () if b in local.tokens)
        finally:
            self.reset()  # an error mid-way leaves no rows behind
        return GenerateOutput(seqs, stats)

    @torch.inference_mode()
    def calibrate(self, sizes: Iterable[int], prompt_tokens: int = 64, rounds: int = 5) -> list[StepCost]:
        """Time one plain decoding step and one speculative round (`EngineConfig.tree`) at each of ``sizes``
        live rows: synthetic text prompts of ``prompt_tokens`` random ordinary tokens, one warm-up then the
        median of ``rounds`` (CUDA synchronised). The engine must be idle and is reset after each size."""
        if self._live or self._queued:
            raise RuntimeError("calibrate needs an idle engine")
        if self.drafter is None:
            raise ValueError("calibrate times speculative rounds: mode 'ar' has none")
        tgt, tree = self.target, self.config.tree
        special = {int(t) for t in tgt.placeholder_ids.tolist()} | set(tgt.eos_token_ids)
        special |= {v for k, v in tgt.config.to_dict().items() if k.endswith("_token_id") and isinstance(v, int)}
        vocab = tgt.lm_head.weight.shape[0]
        ordinary = torch.tensor([t for t in range(vocab) if t not in special], dtype=torch.long)  # [V']
        gen = torch.Generator().manual_seed(0)
        budget = (rounds + 1) * (tree.depth + 2) + 1  # every timed round's tokens fit each row's slots
        costs = []
        policy, self.policy = self.policy, TablePolicy(self.config)  # synthetic rounds teach the policy nothing
        try:
            for rows in sizes:
                ids = ordinary[torch.randint(len(ordinary), (rows, prompt_tokens), generator=gen)]  # [R, T]
                self.add(ids, sampling=SamplingConfig(max_new_tokens=budget))
                try:
                    self._prefill_queued({})
                    spec = self._median_ms(lambda: self._spec_round({}, tree), rounds)
                    ar = self._median_ms(lambda: self._ar_step({}), rounds)
                finally:
                    self.reset()
                costs.append(StepCost(rows, ar, spec))
        finally:
            self.policy = policy
        return costs

    def _median_ms(self, fn: Callable[[], None], rounds: int) -> float:
        fn()  # warm-up (and, after speculative rounds, the draft's lazy catch-up)
        times = []
        for _ in range(rounds):
            clock = _Clock(self.target.device)
            fn()
            times.append(clock.lap())
        return sorted(times)[len(times) // 2]

    # ------------------------------------------------------------ internals
    @staticmethod
    def _check(input_ids, attention_mask):
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a [batch, tokens] LongTensor")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
            )
        m = attention_mask.long()
        if (m[:, 1:] < m[:, :-1]).any():
            raise ValueError("attention_mask must be left-padded (specvlm.inputs.encode / collate pad on the left)")
        if (m.sum(1) == 0).any():
            raise ValueError("a row of attention_mask is all padding")
        return input_ids, m

    @staticmethod
    def _check_sampling(max_new_tokens, temperature, top_p, top_k) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")

    def _groups(self, rows: list[_Row]) -> dict[tuple, list[int] | slice]:
        """Row indices by sampling distribution settings (one `process_logits` call per group); one group
        over every row (the usual case) is ``slice(None)``, so its tensors are views, not copies."""
        out: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            s = r.sampling
            out.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
        return {key: slice(None) for key in out} if len(out) == 1 else out

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """``[R, V]`` logits -> ``[R]`` next tokens, each row under its own settings and generator."""
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)  # [R]
        for (temp, top_k, top_p), idx in self._groups(rows).items():
            probs = process_logits(logits[idx], temp, top_k, top_p, self.target.placeholder_ids)
            if temp == 0:
                out[idx] = probs.argmax(-1)
                continue
            for j, i in enumerate(range(len(rows)) if isinstance(idx, slice) else idx):
                out[i] = sample(probs[j : j + 1], rows[i].generator)[0]
        return out

    def _accept(self, tree: Tree, logits: torch.Tensor, rows: list[_Row]):
        """Per row: greedy or speculative-sampling acceptance over its tree (``logits [R, K, V]``)."""
        R, dev = len(rows), logits.device
        A = int(tree.depth.max()) + 1
        path = torch.zeros(R, A, dtype=torch.long, device=dev)  # [R, A] accepted node indices, root first
        n_acc = torch.ones(R, dtype=torch.long, device=dev)  # [R] nodes accepted, root included
        bonus = torch.zeros(R, dtype=torch.long, device=dev)  # [R] the target's token after the path
        for (temp, top_k, top_p), idx in self._groups(rows).items():
            probs = process_logits(logits[idx], temp, top_k, top_p, self.target.placeholder_ids)
            parts = []
            if temp == 0:
                sub = tree if isinstance(idx, slice) else tree.select(idx)
                parts.append((idx, greedy_accept(sub, probs.argmax(-1))))
            else:  # one row at a time: each row draws from its own generator
                members = range(R) if isinstance(idx, slice) else idx
                parts += [([i], sample_accept(tree.select([i]), probs[j : j + 1], rows[i].generator))
                          for j, i in enumerate(members)]  # fmt: skip
            for at, (p, n, b) in parts:
                path[at, : p.shape[1]] = p
                n_acc[at], bonus[at] = n, b
        return path, n_acc, bonus

    def _prefill_queued(self, emitted: dict) -> None:
        """Prefill every queued group: its rows join the live rows with their first token emitted."""
        queued, self._queued = self._queued, []
        for group in queued:
            self._prefill(group, emitted)

    def _prefill(self, group: _Group, emitted: dict) -> None:
        """The target over the group's prompts (into new pool rows), each row's first token, the draft's prefill."""
        tgt, trees = self.target, self.policy.trees()
        clock = _Clock(tgt.device)
        prompt, ids, mask = group.prompt, group.input_ids, group.mask
        N, T = ids.shape
        budget = max(r.sampling.max_new_tokens for r in group.rows)
        nodes = max(t.total_tokens for t in trees) if self.drafter is not None else 1
        extra = budget + nodes + 1  # slots after the prompt
        start = self.kv.append_rows(N, T + extra)
        self.kv.set_window(start, start + N)
        self.kv.valid[:, :T] = mask
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()[None] & mask[:, None, :]  # [N, T, T]
        pos = prompt.next_position  # [N] position of each row's first generated token
        max_pos = max(self.kv.max_len, int(pos.max()) + extra)  # M-RoPE positions may run past the slots
        rope = self._rope = self._rope.covering(max_pos)
        feats = tgt.forward(prompt.embeds, prompt.positions, self.kv.begin(T, causal), self.kv, rope, prompt.deepstack)
        self.kv.advance(T)
        self.kv.set_window()
        root = self._choose(tgt.logits(feats[:, -1]), group.rows)  # [N]
        target_ms = clock.lap() + group.prompt_ms
        visual, choices = [0] * N, None
        if self.drafter is not None:
            visual, choices = self.drafter.prefill(prompt, ids, mask, feats, root, causal, trees, budget, max_pos)
        draft_ms = clock.lap()
        self._live += group.rows
        self._root = torch.cat([self._root, root])  # [R]
        self._pos = torch.cat([self._pos, pos])  # [R]
        for i, row in enumerate(group.rows):
            st = row.stats
            st.prefill_ms, st.draft_prefill_ms = target_ms + draft_ms, draft_ms
            st.target_forwards, st.draft_forwards = 1, int(self.drafter is not None)
            if self.drafter is not None:
                st.draft_visual_tokens = visual[i]
                if choices is not None:
                    st.compressor = self.draft.compressor.names[choices[i]]
        self._emit(group.rows, [[t] for t in root.tolist()], emitted)

    def _ar_step(self, emitted: dict) -> None:
        """One target forward per live row over its last token. With a draft (a round the batch-aware
        policy runs without speculation) the draft only records the new entries (`Drafter.follow`)."""
        tgt, rows = self.target, self._live
        R, dev = len(rows), self._root.device
        clock = _Clock(dev)
        one = torch.ones(R, 1, 1, dtype=torch.bool, device=dev)  # [R, Q=1, 1] each token sees itself
        f = tgt.forward(tgt.embed_tokens(self._root[:, None]), self._pos[:, None], self.kv.begin(1, one), self.kv,
                        self._rope)  # fmt: skip  # [R, 1, D]
        self.kv.advance(1)
        root = self._choose(tgt.logits(f[:, 0]), rows)
        verify_ms = clock.lap()
        if self.drafter is not None:
            self.drafter.follow(root, f[:, 0])  # the draft catches up on these when speculation resumes
        self._root, self._pos = root, self._pos + 1
        self.policy.observe(R, verify_ms, None)
        for r in rows:
            r.stats.target_forwards += 1
            r.stats.verify_ms += verify_ms
        self._emit(rows, [[t] for t in self._root.tolist()], emitted)

    def _spec_round(self, emitted: dict, tree_cfg: TreeConfig) -> None:
        """propose / verify / accept / commit / catch-up for every live row."""
        tgt, drafter, rows = self.target, self.drafter, self._live
        root, pos = self._root, self._pos
        clock = _Clock(root.device)
        tree = drafter.propose(root, pos, tree_cfg)
        draft_ms = clock.lap()
        mask4 = self.kv.begin(tree.num_nodes, tree.ancestors)
        tf = tgt.forward(
            tgt.embed_tokens(tree.tokens), pos[:, None] + tree.depth, mask4, self.kv, self._rope
        )  # [R, K, D]
        path, n_acc, bonus = self._accept(tree, tgt.logits(tf), rows)
        nodes = tree.valid.sum(1) if tree.valid is not None else torch.full_like(n_acc, tree.num_nodes)  # [R]
        n_list, node_list = torch.stack([n_acc, nodes]).tolist()  # the round's one read-back: what each row emits
        self.kv.commit(path, n_acc, n_list)
        verify_ms = clock.lap()
        # draft catch-up over the accepted path: entry a = (target feature of node a, the token after it)
        path_tokens = tree.tokens.gather(1, path)  # [R, A]
        nxt = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], dim=1)  # [R, A]
        nxt.scatter_(1, (n_acc - 1)[:, None], bonus[:, None])
        path_feats = tf.gather(1, path[..., None].expand(-1, -1, tf.shape[-1]))  # [R, A, D]
        drafter.catch_up(nxt, path_feats, n_acc, pos, n_list)
        self._pos = pos + n_acc
        self._root = bonus
        draft_ms += clock.lap()
        for r, n_nodes in zip(rows, node_list):
            st = r.stats
            st.target_forwards += 1
            st.tree_nodes += n_nodes
            st.draft_forwards += tree.levels  # tree steps + the catch-up
            st.draft_ms += draft_ms
            st.verify_ms += verify_ms
        self.policy.observe(len(rows), draft_ms + verify_ms, n_list)
        out = [toks[1:n] + [b] for toks, n, b in zip(path_tokens.tolist(), n_list, bonus.tolist())]
        self._emit(rows, out, emitted)

    def _emit(self, rows: list[_Row], tokens: list[list[int]], emitted: dict) -> None:
        """Append each row's new tokens up to a stop id or its budget (marking it done)."""
        for row, toks in zip(rows, tokens):
            if row.done:
                continue
            start = len(row.seq)
            for t in toks:
                row.seq.append(t)
                if t in row.stops or len(row.seq) >= row.sampling.max_new_tokens:
                    row.done = True
                    break
            row.stats.num_tokens = len(row.seq)
            emitted.setdefault(row.rid, []).extend(row.seq[start:])  # a new row: its first token, then its round's

    def _retire(self) -> None:
        """Finished rows leave the pools; queued rows that were ended before joining are dropped."""
        self._queued = [g for g in self._queued if not all(r.done for r in g.rows)]
        keep = [i for i, r in enumerate(self._live) if not r.done]
        if len(keep) == len(self._live):
            return
        order = self.kv.keep_rows(keep)
        if self.drafter is not None:
            self.drafter.keep_rows(keep)
        idx = torch.tensor(order, dtype=torch.long, device=self._root.device)
        self._live = [self._live[i] for i in order]
        self._root, self._pos = self._root[idx], self._pos[idx]
