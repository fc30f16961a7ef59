"""The ``specvlm`` command line. Subcommands import their heavy modules lazily.

specvlm demo            run the engine end to end on the built-in default and print what it produced
specvlm bench [NAME]    benchmarks (default: all), tables printed and written under results/ (from a checkout)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

JOBS = ("caption", "distill", "serve")  # subcommands with their own argument parsers (pipelines/<name>.py)
BENCHES = ("engine", "demo", "compressor", "caption", "serve", "online")
DEMO_FAMILIES = ("llava", "qwen2_5_vl")  # specvlm.demo.recipe.DEMO_FAMILIES (not imported: the CLI starts fast)


def _job_main(name: str):
    """The job's ``main``, imported only when it runs (each pulls in Ray and the engine)."""
    if name == "caption":
        from pipelines.caption import main
    elif name == "distill":
        from pipelines.distill import main
    else:
        from pipelines.serve import main
    return main


def _demo_model(args: argparse.Namespace) -> None:
    import shutil

    from specvlm.demo import demo_dir
    from specvlm.demo.recipe import DemoRecipe, build_demo, is_built

    out = Path(args.output) if args.output else demo_dir(args.family)
    recipe = DemoRecipe.for_family(args.family)
    recipe = recipe.small() if args.small else recipe
    work = out.parent / f".{out.name}-build"  # an interrupted build resumes from its finished stages
    if is_built(out, recipe) and not args.force:
        print(f"demo model already built in {out} (use --force to rebuild)")
        return
    if args.force and work.exists():
        shutil.rmtree(work)
    if out.exists() and not args.force and not work.exists():  # an older build: keep the stages this recipe reuses
        print(f"{out} holds a demo built by another recipe or an older version; rebuilding what changed")
        out.rename(work)
    print(
        f"building the demo target VLM and its eagle + specvlm drafts into {out} (deterministic; on 2 cores "
        "~25 min with native bf16, ~35 min in float32; the package ships this build, so only a rebuild needs it)"
    )
    metrics = build_demo(work, recipe)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    q = metrics["target"]
    print(
        f"demo target: held-out token accuracy {q['token_accuracy']:.3f}, exact match {q['exact_match']:.3f}, "
        f"caption exact match {q['caption_exact_match']:.3f}; written to {out}"
    )


TREE_FLAGS = {"top_k": int, "total_tokens": int, "depth": int, "depth_min_prob": float, "node_min_prob": float}


def _demo(args: argparse.Namespace) -> None:
    import torch

    from specvlm import EngineConfig, SpecVLMEngine, TreeConfig
    from specvlm.config import CPU_TREE
    from specvlm.demo import DemoNotBuiltError, load_demo
    from specvlm.demo.recipe import examples
    from specvlm.inputs import encode

    try:
        demo = load_demo()
    except DemoNotBuiltError as e:
        raise SystemExit(str(e)) from None
    torch.manual_seed(0)
    given = {k: getattr(args, k) for k in TREE_FLAGS if getattr(args, k) is not None}
    tree = TreeConfig(**(CPU_TREE.model_dump() | given))
    engines = {
        "ar": SpecVLMEngine(demo.target, None, EngineConfig(mode="ar")),
        "eagle": SpecVLMEngine(demo.target, demo.draft, EngineConfig(mode="eagle", tree=tree)),
        "specvlm": SpecVLMEngine(demo.target, demo.specvlm_draft, EngineConfig(mode="specvlm", tree=tree)),
    }
    tok = demo.processor.tokenizer
    print(f"specvlm demo: demo target from {demo.path}, greedy, batch 1")
    for i, s in enumerate(examples(seed=12345, n=args.num, p_video=0.25, p_qa=0.25)):
        enc = encode(demo.processor, [s["prompt"]], [s["image"]])
        outs = {m: e.generate(**enc, max_new_tokens=args.max_new_tokens) for m, e in engines.items()}
        text = tok.decode(outs["eagle"].sequences[0], skip_special_tokens=True)
        ar = outs["ar"].stats[0]
        ar_ms = ar["prefill_ms"] + ar["verify_ms"]
        print(f"[{i}] Q: {s['prompt']}\n    A: {text}\n    truth: {s['response']}")
        for mode in ("eagle", "specvlm"):
            st = outs[mode].stats[0]
            ms = st["prefill_ms"] + st["draft_ms"] + st["verify_ms"]
            same = outs[mode].sequences == outs["ar"].sequences
            extra = f" compressor={st['compressor']} visual_tokens={st['draft_visual_tokens']}" * (mode == "specvlm")
            print(
                f"    {mode}: accept_length={st['accept_length']:.2f} target_forwards={st['target_forwards']} "
                f"{ms:.0f}ms vs ar {ar_ms:.0f}ms ({ar_ms / ms:.2f}x) identical_to_ar={same}{extra}"
            )


def _bench(args: argparse.Namespace) -> None:
    try:
        import benchmarks  # noqa: F401
    except ImportError:  # not in the wheel: the checkout's folder, when run from the checkout's root
        if not (Path.cwd() / "benchmarks" / "report.py").is_file():
            raise SystemExit(
                "specvlm bench runs the benchmarks of a source checkout (they are not in the wheel): run it from "
                "the repository's root, or `make bench` there"
            ) from None
        sys.path.insert(0, str(Path.cwd()))
    from benchmarks import caption, compressor, demo, engine, online, serve

    modules = {"engine": engine, "demo": demo, "compressor": compressor, "caption": caption, "serve": serve,
               "online": online}  # fmt: skip
    for name in BENCHES if args.name == "all" else (args.name,):
        modules[name].main(args.rest)


def main(argv: list[str] | None = None) -> int:
    """The console script; returns the exit status (0: done; a subcommand's own status otherwise)."""
    ap = argparse.ArgumentParser(prog="specvlm", description="SpecVLM: lossless speculative decoding for VLMs")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="answer a few demo questions with the demo model and print the stats")
    demo.add_argument("--num", type=int, default=6, help="examples to run")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    for name, kind in TREE_FLAGS.items():  # default None: specvlm.config.CPU_TREE's (imported lazily)
        demo.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"TreeConfig.{name} (default: the cpu tree's)")
    demo.set_defaults(func=_demo)
    dm = sub.add_parser(
        "demo-model",
        help="rebuild the demo target VLM and its drafts from the recipe into $SPECVLM_HOME/demo (one ships)",
    )
    dm.add_argument("--force", action="store_true", help="rebuild even if present")
    dm.add_argument("--small", action="store_true", help="the reduced recipe the tests use (seconds)")
    dm.add_argument("--output", help="folder (default: $SPECVLM_HOME/demo, or demo-<family>)")
    dm.add_argument("--family", default="llava", choices=DEMO_FAMILIES,
                    help="the demo target's family: llava (the default, shipped) or qwen2_5_vl")  # fmt: skip
    dm.set_defaults(func=_demo_model)
    # subcommands with their own argument parsers: everything after the name is theirs
    sub.add_parser("caption", help="batch-caption images/videos with Ray Data (demo model by default)", add_help=False)
    sub.add_parser("distill", help="distil the draft with Ray Train (demo draft by default)", add_help=False)
    sub.add_parser("serve", help="OpenAI-compatible endpoint on Ray Serve (demo model by default)", add_help=False)
    bench = sub.add_parser("bench", help="run benchmarks and write their tables")
    bench.add_argument("name", nargs="?", default="all", choices=("all", *BENCHES))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    bench.set_defaults(func=_bench)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in JOBS:
        return _job_main(argv[0])(argv[1:]) or 0
    args = ap.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
