"""`SpecVLMEngine`: batched lossless speculative decoding for HF vision-language models.

Legend: B batch rows (active ones), T prompt tokens, K tree nodes, A path
slots (max depth + 1), D hidden, V vocab.

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

One round for a batch (see DESIGN.md's cost model)::

    propose_tree   depth-1 draft forwards over the frontier   (draft KV, not committed)
    verify         one target forward over all K tree nodes   (target KV, pending)
    accept         greedy or speculative sampling -> path, bonus token
    commit         target KV: in-place gather of the accepted path
    catch-up       one draft forward over the accepted path   (draft KV, committed)

Rows are left-padded; a row that hits EOS or ``max_new_tokens`` leaves the
batch (its KV rows are dropped) and the others go on. ``generate(on_tokens=fn)``
reports every round's new tokens as they are accepted (for streaming) and lets
the caller end rows early (stop strings, per-request limits, cancelled requests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import EngineConfig
from .draft import EagleDraft
from .kv import SlotKVCache
from .target import TargetAdapter
from .tree import propose_tree
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
    """What one step emitted (the prefill's first token, then each round), passed to ``generate(on_tokens=)``."""

    tokens: dict[int, list[int]]  # row -> ids emitted this step, EOS included when reached; every active row
    finished: set[int]  # rows that ended this step (EOS or max_new_tokens)
    stats: dict[int, dict]  # row -> RowStats.to_dict() so far, for the rows in `tokens`


OnTokens = Callable[[TokenEvent], Iterable[int] | None]  # returns rows to finish now


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


class SpecVLMEngine:
    """Generate with a target VLM, optionally accelerated by an `EagleDraft`.

    Args:
        model: an HF VLM (see `target.SUPPORTED`), used in its own dtype/device.
        draft: the draft for ``eagle`` mode (bound to the target's embedding / LM head here).
        config: `EngineConfig`.
    """

    def __init__(self, model: nn.Module, draft: EagleDraft | None = None, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.target = TargetAdapter(model)
        model.eval()
        mode = self.config.mode
        if mode in ("eagle", "specvlm"):
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
        self.draft = draft

    # ------------------------------------------------------------------ API
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
        **mm_kwargs,
    ) -> GenerateOutput:
        """Decode a batch of left-padded prompts.

        Args:
            input_ids: ``[B, T]`` prompt ids with image placeholders.
            attention_mask: ``[B, T]`` 1 for tokens, 0 for left padding (default: all ones).
            pixel_values: as the model's processor returns them.
            max_new_tokens, temperature, top_p, top_k: HF generate's meaning.
            seed: makes sampling reproducible.
            on_tokens: called after every step (in the calling thread) with a `TokenEvent`; it may
                return rows (batch indices) to finish now: they leave the batch, their tokens so
                far stay in the output. Rows it does not name decode exactly as without it.
            mm_kwargs: other processor outputs for the model (``image_sizes``).
        """
        input_ids, attention_mask = self._check(input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k)
        dev = self.target.device
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, suppress=self.target.placeholder_ids)
        mm_kwargs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in mm_kwargs.items()}
        pv = pixel_values.to(dev) if pixel_values is not None else None
        return self._decode(
            input_ids.to(dev), attention_mask.to(dev), pv, max_new_tokens, sampling, gen, mm_kwargs, on_tokens
        )

    # ------------------------------------------------------------ internals
    def _check(self, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k):
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
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        return input_ids, m

    def _choose(self, logits: torch.Tensor, sampling: dict, gen) -> torch.Tensor:
        """``[B, V]`` logits -> ``[B]`` next tokens under the target's own distribution."""
        out = process_logits(logits, **sampling)
        return out.argmax(-1) if sampling["temperature"] == 0 else sample(out, gen)

    def _decode(self, input_ids, mask, pixel_values, max_new_tokens, sampling, gen, mm_kwargs, on_tokens=None):
        tgt, draft, tree_cfg = self.target, self.draft, self.config.tree
        eagle = self.config.mode != "ar"  # eagle or specvlm: the speculative loop
        B, T = input_ids.shape
        dev = input_ids.device
        stats = [RowStats() for _ in range(B)]
        seqs: list[list[int]] = [[] for _ in range(B)]
        clock = _Clock(dev)

        # ---- prefill: target over the prompt, first token
        specvlm = self.config.mode == "specvlm"  # only the compressor needs the images' patch layouts
        prompt = tgt.prompt(input_ids, mask, pixel_values, return_layouts=specvlm, **mm_kwargs)
        embeds, positions = prompt.embeds, prompt.positions  # [B, T, D], [B, T] or [3, B, T] (M-RoPE)
        K, depth, k = tree_cfg.total_tokens, tree_cfg.depth, tree_cfg.top_k
        extra = max_new_tokens + (K if eagle else 1) + 1  # slots / positions a row can use after its prompt
        kv = tgt.new_cache(B, T + extra)
        kv.valid[:, :T] = mask.bool()
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None] & mask.bool()[:, None, :]  # [B, T, T]
        pos = prompt.next_position  # [B] position of the root token (every M-RoPE axis)
        max_pos = max(kv.max_len, int(pos.max()) + extra)  # M-RoPE positions may run past the slots
        rope = tgt.rotary_table(max_pos)
        feats = tgt.forward(embeds, positions, kv.begin(T, causal), kv, rope, prompt.deepstack)  # [B, T, D]
        kv.advance(torch.full((B,), T, device=dev))
        root = self._choose(tgt.logits(feats[:, -1]), sampling, gen)  # [B]
        root_hidden = None
        target_prefill_ms = clock.lap()
        if eagle:
            next_ids = torch.cat([input_ids[:, 1:], root[:, None]], dim=1)  # [B, T] token after each entry
            h = draft.project(torch.cat([embeds[:, 1:], draft.embed(root[:, None])], dim=1), feats)  # [B, T, D]
            d_pos, d_valid, d_causal = positions, mask.bool(), causal  # draft prompt = target's unless compressed
            span = tgt.is_visual(next_ids)  # [B, T] entries whose next token is visual
            visual = span.sum(1).tolist()  # [B] visual tokens per row (the target's)
            if specvlm:
                comp = draft.compressor.compress(h, positions, mask.bool(), span, prompt.layouts, feats, feats[:, -1])
                h, d_pos, d_valid = comp.embeds, comp.positions, comp.valid  # [B, T', D], [(3,) B, T'], [B, T']
                tril = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=dev).tril()  # [T', T']
                d_causal = tril[None] & d_valid[:, None, :]  # [B, T', T']
                visual = comp.visual_tokens.tolist()
                for b, choice in enumerate(comp.choice.tolist()):
                    stats[b].compressor = draft.compressor.names[choice]
            for b in range(B):
                stats[b].draft_visual_tokens = visual[b]
            T2 = h.shape[1]
            dkv = SlotKVCache(
                1, B, tgt.num_kv_heads, tgt.head_dim,
                T2 + max_new_tokens + (depth - 1) * k + depth + 2, tgt.dtype, dev,
            )  # fmt: skip
            dkv.valid[:, :T2] = d_valid
            draft_rope = draft.rotary_table(max(dkv.max_len, max_pos), embeds)
            suppress = torch.zeros(tgt.lm_head.out_features, dtype=torch.float32, device=dev)  # [V] additive
            suppress[tgt.placeholder_ids] = float("-inf")
            g = draft.decode(h, d_pos, dkv.begin(T2, d_causal), dkv, draft_rope)  # [B, T', D]
            dkv.advance(torch.full((B,), T2, device=dev))
            root_hidden = g[:, -1]  # [B, D]
        draft_prefill_ms = clock.lap()
        rows = list(range(B))  # original index of each active row
        for b in rows:
            st = stats[b]
            st.prefill_ms, st.draft_prefill_ms = target_prefill_ms + draft_prefill_ms, draft_prefill_ms
            st.target_forwards, st.draft_forwards = 1, int(eagle)
        done = self._emit(seqs, stats, rows, [[t] for t in root.tolist()], max_new_tokens, on_tokens)

        while True:
            keep = [i for i, r in enumerate(rows) if r not in done]
            if not keep:
                break
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=dev)
                rows = [rows[i] for i in keep]
                kv.select_rows(idx)
                root, pos = root[idx], pos[idx]
                if eagle:
                    dkv.select_rows(idx)
                    root_hidden = root_hidden[idx]
            n_rows = len(rows)
            if not eagle:  # ---- autoregressive step
                one = torch.ones(n_rows, 1, 1, dtype=torch.bool, device=dev)
                f = tgt.forward(tgt.embed_tokens(root[:, None]), pos[:, None], kv.begin(1, one), kv, rope)  # [B, 1, D]
                kv.advance(torch.ones(n_rows, dtype=torch.long, device=dev))
                root = self._choose(tgt.logits(f[:, 0]), sampling, gen)
                pos = pos + 1
                verify_ms = clock.lap()
                for r in rows:
                    stats[r].target_forwards += 1
                    stats[r].verify_ms += verify_ms
                done |= self._emit(seqs, stats, rows, [[t] for t in root.tolist()], max_new_tokens, on_tokens)
                continue

            # ---- speculative round
            tree = propose_tree(
                draft, dkv, root, root_hidden, pos, k, depth, K, suppress, draft_rope,
                tree_cfg.depth_min_prob, tree_cfg.node_min_prob,
            )  # fmt: skip
            draft_ms = clock.lap()
            mask4 = kv.begin(tree.num_nodes, tree.ancestors)
            tf = tgt.forward(tgt.embed_tokens(tree.tokens), pos[:, None] + tree.depth, mask4, kv, rope)  # [B, K, D]
            logits = tgt.logits(tf)  # [B, K, V]
            if sampling["temperature"] == 0:
                path, n_acc, bonus = greedy_accept(tree, process_logits(logits, **sampling).argmax(-1))
            else:
                path, n_acc, bonus = sample_accept(tree, process_logits(logits, **sampling), gen)
            kv.commit(path, n_acc)
            verify_ms = clock.lap()
            # draft catch-up over the accepted path: entry i = (target feature of node i, next token)
            A = path.shape[1]
            path_tokens = tree.tokens.gather(1, path)  # [B, A]
            nxt = torch.cat([path_tokens[:, 1:], path_tokens[:, :1]], dim=1)  # [B, A]
            nxt.scatter_(1, (n_acc - 1)[:, None], bonus[:, None])
            path_feats = tf.gather(1, path[..., None].expand(-1, -1, tf.shape[-1]))  # [B, A, D]
            tril = torch.ones(A, A, dtype=torch.bool, device=dev).tril().expand(n_rows, A, A)
            cpos = pos[:, None] + torch.arange(A, device=dev)  # [B, A]
            g = draft(draft.embed(nxt), path_feats, cpos, dkv.begin(A, tril), dkv, draft_rope)
            dkv.advance(n_acc)
            root_hidden = g.gather(1, (n_acc - 1)[:, None, None].expand(-1, 1, g.shape[-1]))[:, 0]  # [B, D]
            pos = pos + n_acc
            root = bonus
            draft_ms += clock.lap()
            emitted = [toks[1:n] + [b] for toks, n, b in zip(path_tokens.tolist(), n_acc.tolist(), bonus.tolist())]
            for r in rows:
                st = stats[r]
                st.target_forwards += 1
                st.draft_forwards += tree.levels  # tree steps + the catch-up
                st.draft_ms += draft_ms
                st.verify_ms += verify_ms
            done |= self._emit(seqs, stats, rows, emitted, max_new_tokens, on_tokens)

        return GenerateOutput(seqs, [s.to_dict() for s in stats])

    def _emit(self, seqs, stats, rows, emitted, max_new_tokens, on_tokens=None) -> set[int]:
        """Append each active row's new tokens; return the rows that finished (or that on_tokens ends)."""
        eos = self.target.eos_token_ids
        finished, new = set(), {}
        for r, toks in zip(rows, emitted):
            start = len(seqs[r])
            for t in toks:
                seqs[r].append(t)
                if t in eos or len(seqs[r]) >= max_new_tokens:
                    finished.add(r)
                    break
            stats[r].num_tokens = len(seqs[r])
            new[r] = seqs[r][start:]
        if on_tokens is not None:
            ended = on_tokens(TokenEvent(new, set(finished), {r: stats[r].to_dict() for r in rows}))
            finished.update(r for r in ended or () if r in new)
        return finished
