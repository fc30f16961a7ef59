"""Engine benchmark: HF generate vs the engine's `ar` loop vs `eagle`, side by side in one run.

Run with ``make bench`` / ``specvlm bench engine`` / ``python -m benchmarks.engine``.

On a random-init target of 8 decoder layers x 512 hidden (vocab 32000, a
small CLIP tower) with an untrained one-layer draft, accept length is near 1:
this table measures the harness and the loop's overhead, not speedup (the
demo model's table does that). Every row reports accept length and the time
split, so the speedup can be explained by the cost model in DESIGN.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import RESULTS, to_markdown, write_results
from specvlm import EagleDraft, EngineConfig, SpecVLMEngine, TreeConfig
from specvlm.config import CPU_TREE
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="specvlm bench engine", description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for engine.md / engine.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    header = (
        f"## Engine: 8x512 random target, untrained draft, CPU ({torch.get_num_threads()} threads), "
        f"greedy, {args.max_new_tokens} new tokens, the CPU tree ({CPU_TREE!r})"
    )
    print(header, flush=True)
    rows = run(tuple(int(b) for b in args.batch_sizes.split(",")), args.max_new_tokens, args.repeats)
    table = to_markdown(rows, COLS)
    print(table)
    write_results(args.out, "engine", header + "\n\n" + table + "\n", rows)


if __name__ == "__main__":
    main()
