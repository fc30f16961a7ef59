"""The ``specvlm`` command line. Subcommands import their heavy modules lazily.

specvlm demo            run the engine end to end on the built-in default and print what it produced
specvlm bench [NAME]    benchmarks (default: all), tables printed and written under benchmarks/results/
"""

from __future__ import annotations

import argparse
import sys

BENCHES = ("engine",)


def _demo(args: argparse.Namespace) -> None:
    import torch

    from specvlm import EagleDraft, EngineConfig, SpecVLMEngine, TreeConfig
    from specvlm.tiny import tiny_inputs, tiny_llava

    torch.manual_seed(0)
    model = tiny_llava(layers=4, hidden=128, vocab=256)
    inputs = tiny_inputs(model, [6, 10], seed=0)
    draft = EagleDraft.from_target(model, seed=0)
    tree = TreeConfig(top_k=4, total_tokens=16, depth=4)
    print("specvlm demo: tiny random-init LLaVA (4x128 decoder), untrained draft, 2 prompts")
    for mode in ("ar", "eagle"):
        engine = SpecVLMEngine(model, draft if mode == "eagle" else None, EngineConfig(mode=mode, tree=tree))
        out = engine.generate(**inputs, max_new_tokens=args.max_new_tokens)
        for i, (seq, st) in enumerate(zip(out.sequences, out.stats)):
            print(f"[{mode}] row {i}: tokens={seq}")
            print(
                f"         num_tokens={st['num_tokens']} accept_length={st['accept_length']:.2f} "
                f"target_forwards={st['target_forwards']} draft_forwards={st['draft_forwards']} "
                f"prefill={st['prefill_ms']:.1f}ms draft={st['draft_ms']:.1f}ms verify={st['verify_ms']:.1f}ms"
            )


def _bench(args: argparse.Namespace) -> None:
    names = BENCHES if args.name == "all" else (args.name,)
    for name in names:
        if name == "engine":
            from benchmarks.engine import main

            main(args.rest)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="specvlm", description="SpecVLM: lossless speculative decoding for VLMs")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the engine on the built-in default and print the result")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="run benchmarks and write their tables")
    bench.add_argument("name", nargs="?", default="all", choices=("all", *BENCHES))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    bench.set_defaults(func=_bench)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
