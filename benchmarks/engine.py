"""Engine benchmark: HF generate vs the engine's `ar` loop vs `eagle`, side by side in one run.

Run with ``make bench`` / ``specvlm bench engine`` / ``python -m benchmarks.engine``.

1. On a random-init target of 8 decoder layers x 512 hidden (vocab 32000, a
   small CLIP tower) with an untrained one-layer draft, accept length is near
   1: this table measures the harness and the loop's overhead, not speedup
   (the demo model's table does that). Every row reports accept length and
   the time split, so the speedup can be explained by the cost model in
   DESIGN.md.
2. Batch sweep on the demo model (``--sweep``): tokens/s at batch 1, 2, 4, 8,
   16 for ``ar``, ``eagle`` on the CPU tree, and the batch-aware policy
   (``batch_trees: auto``, `specvlm.policy.AutoPolicy`: step costs timed at
   start-up, accept length learned from its own rounds). Rounds interleave
   the three methods; medians with their range.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.report import add_output_args, to_markdown, write_results
from specvlm import EagleDraft, EngineConfig, SpecVLMEngine, TreeConfig
from specvlm.config import CPU_TREE
from specvlm.engine import pooled_accept_length
from specvlm.tiny import IMAGE, tiny_inputs, tiny_llava

COLS = ["method", "batch", "tokens_per_s", "speedup", "accept_length", "prefill_ms", "draft_ms", "verify_ms",
        "identical_to_hf"]  # fmt: skip


def bench_target(layers: int = 8, hidden: int = 512, vocab: int = 32000):
    """A random-init LLaVA with a decoder of ``layers`` x ``hidden``; EOS disabled so runs are full length."""
    model = tiny_llava(
        hidden=hidden, layers=layers, heads=8, kv_heads=8, vocab=vocab, image_size=64, patch=8,
        intermediate=int(hidden * 2.6875), seed=0,
    )  # fmt: skip
    model.generation_config.eos_token_id = None
    model.config.text_config.eos_token_id = None
    return model


def _time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(batch_sizes=(1, 8), max_new_tokens: int = 64, repeats: int = 3, tree: TreeConfig = CPU_TREE) -> list[dict]:
    model = bench_target()
    draft = EagleDraft.from_target(model, seed=0)
    engines = {
        "ar": SpecVLMEngine(model, None, EngineConfig(mode="ar")),
        "eagle": SpecVLMEngine(model, draft, EngineConfig(mode="eagle", tree=tree)),
    }
    rows = []
    for B in batch_sizes:
        inputs = tiny_inputs(model, [12 + 3 * (b % 4) for b in range(B)], seed=B)
        hf_s, hf_out = _time(
            lambda inputs=inputs: model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=[IMAGE], pad_token_id=0
            ),
            repeats,
        )
        hf_tokens = B * max_new_tokens
        rows.append(dict(method="hf_generate", batch=B, tokens_per_s=hf_tokens / hf_s, speedup=1.0))
        ref = hf_out[:, inputs["input_ids"].shape[1] :].tolist()
        for name, eng in engines.items():
            run_engine = lambda eng=eng, inputs=inputs: eng.generate(**inputs, max_new_tokens=max_new_tokens)
            sec, out = _time(run_engine, repeats)
            n = sum(len(s) for s in out.sequences)
            st = out.stats
            rows.append(
                dict(
                    method=name,
                    batch=B,
                    tokens_per_s=n / sec,
                    speedup=(n / sec) / (hf_tokens / hf_s),
                    accept_length=statistics.mean(s["accept_length"] for s in st),
                    prefill_ms=statistics.mean(s["prefill_ms"] for s in st),
                    draft_ms=statistics.mean(s["draft_ms"] for s in st),
                    verify_ms=statistics.mean(s["verify_ms"] for s in st),
                    identical_to_hf=out.sequences == ref,
                )
            )
    return rows


SWEEP_COLS = ["batch", "method", "tokens_per_s", "tokens_per_s_range", "accept_length", "identical_to_ar"]


def sweep(batch_sizes=(1, 2, 4, 8, 16), max_new_tokens: int = 48, rounds: int = 3) -> tuple[list[dict], dict]:
    """Demo model, greedy captions, questions and videos: tokens/s per batch size for ar, eagle (CPU tree) and
    the auto batch-aware policy; returns the rows and the policy's state at the end (`AutoPolicy.describe`).

    Every batch size decodes the same 16 inputs (in batches of B); ``rounds`` rounds run the three methods
    back to back per batch size (interleaved, the first one rotating) and the table quotes each method's
    median and range. The policy's start-up calibration is not timed.
    """
    from specvlm.demo import load_demo
    from specvlm.demo.recipe import examples
    from specvlm.distill import encode_samples

    demo = load_demo()
    samples = examples(seed=31, n=max(16, *batch_sizes), p_video=0.2, p_qa=0.3)
    inputs = {B: [encode_samples(demo.processor, samples[i : i + B]) for i in range(0, len(samples), B)]
              for B in batch_sizes}  # fmt: skip
    ar = SpecVLMEngine(demo.target, None, EngineConfig(mode="ar"))
    eagle = SpecVLMEngine(demo.target, demo.draft, EngineConfig(mode="eagle", tree=CPU_TREE))
    auto = SpecVLMEngine(demo.target, demo.draft, EngineConfig(mode="eagle", tree=CPU_TREE, batch_trees="auto",
                                                               auto_rows=tuple(batch_sizes)))  # fmt: skip

    def timed(engine, B):
        t0 = time.perf_counter()
        seqs, stats = [], []
        for enc in inputs[B]:
            out = engine.generate(**enc, max_new_tokens=max_new_tokens)
            seqs += out.sequences
            stats += out.stats
        return sum(len(q) for q in seqs) / (time.perf_counter() - t0), (seqs, stats)

    methods = {"ar": ar, "eagle": eagle, "batch-aware auto": auto}
    for engine in methods.values():
        engine.generate(**inputs[batch_sizes[0]][0], max_new_tokens=4)  # warm-up
    rows = []
    for B in batch_sizes:
        tps = {name: [] for name in methods}
        outs = {}
        for r in range(rounds):
            names = list(methods)[r % 3 :] + list(methods)[: r % 3]  # rotate who runs first
            for name in names:
                t, outs[name] = timed(methods[name], B)
                tps[name].append(t)
        for name in methods:
            rows.append(dict(batch=B, method=name, tokens_per_s=statistics.median(tps[name]),
                             tokens_per_s_range=f"{min(tps[name]):.1f}-{max(tps[name]):.1f}",
                             accept_length=pooled_accept_length(outs[name][1]),
                             identical_to_ar=outs[name][0] == outs["ar"][0]))  # fmt: skip
    return rows, auto.policy.describe()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="specvlm bench engine", description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    add_output_args(ap, "engine.md / engine-batching.md (and .json)")
    ap.add_argument("--sweep", action="store_true", help="only the demo model's batch sweep (engine-batching.md)")
    ap.add_argument("--sweep-sizes", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.sweep:
        sizes = tuple(int(b) for b in args.sweep_sizes.split(","))
        rows, policy = sweep(sizes, args.max_new_tokens, args.repeats)
        costs = ", ".join(f"{c['rows']}: {c['ar_ms']:.1f} / {c['spec_ms']:.1f}" for c in policy["costs"])
        header = (f"## Batch sweep: demo model, CPU ({torch.get_num_threads()} threads), greedy, max "
                  f"{args.max_new_tokens} new tokens, median of {args.repeats} runs (range). The auto policy "
                  f"ended with accept length {policy['accept_length']:.2f} and plain decoding from "
                  f"{policy['crossover'] or 'no measured'} rows on; its step costs (rows: plain ms / speculative "
                  f"ms) {costs}")  # fmt: skip
        table = to_markdown(rows, SWEEP_COLS)
        print(header + "\n\n" + table)
        write_results(
            args.out, "engine-batching", header + "\n\n" + table + "\n", {"rows": rows, "policy": policy}, args.label
        )
        return
    header = (
        f"## Engine: 8x512 random target, untrained draft, CPU ({torch.get_num_threads()} threads), "
        f"greedy, {args.max_new_tokens} new tokens, the CPU tree ({CPU_TREE!r})"
    )
    print(header, flush=True)
    rows = run(tuple(int(b) for b in args.batch_sizes.split(",")), args.max_new_tokens, args.repeats)
    table = to_markdown(rows, COLS)
    print(table)
    write_results(args.out, "engine", header + "\n\n" + table + "\n", rows, args.label)


if __name__ == "__main__":
    main()
