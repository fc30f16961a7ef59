"""Visual compressor benchmark on the demo model, in the manner of the SpecVLM paper's Table 4.

Run with ``make bench`` / ``specvlm bench compressor`` / ``python -m benchmarks.compressor``.

1. Per primitive and ratio: a draft with that one primitive is distilled
   jointly with it for ``--steps`` steps (same seed, data and steps as an
   uncompressed ``eagle`` draft and an elastic ``select`` draft trained beside
   them); then, on the same held-out mix of captions, videos and questions
   (greedy, batch 1, CPU): accept length, visual tokens the draft reads, the
   draft's prefill ms and the end-to-end speedup over the target's own HF
   ``generate`` (all methods in one process, side by side).
2. The demo's full drafts (shipped with the package): ``eagle`` vs ``specvlm``
   (elastic selection), per task kind, with the distribution of the gate's
   choices. Targets: accept length within 3% of ``eagle``, >= 4x fewer draft
   visual tokens, at least as fast end to end.

``--family qwen2_5_vl`` runs both on the Qwen2.5-VL demo (videos as video input).
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

import torch

from benchmarks.demo import FIXED_TREE, KINDS, TREES, hf_generate, measure, speed_row
from benchmarks.report import add_output_args, to_markdown, write_results
from specvlm import EngineConfig, SpecVLMEngine
from specvlm.config import CompressorConfig, PrimitiveConfig
from specvlm.demo import load_demo
from specvlm.demo.recipe import DEMO_FAMILIES, DemoRecipe, distill_demo_draft, draft_data, examples
from specvlm.distill import encode_samples
from specvlm.target import TargetAdapter

TREE = TREES[FIXED_TREE]  # a fixed tree: both drafts verify the same number of nodes per round
PRIMITIVES = [
    PrimitiveConfig(kind="pool", ratio=4), PrimitiveConfig(kind="pool", ratio=16),
    PrimitiveConfig(kind="conv", ratio=4), PrimitiveConfig(kind="conv", ratio=16),
    PrimitiveConfig(kind="prune", ratio=4), PrimitiveConfig(kind="prune", ratio=16),
    PrimitiveConfig(kind="prune", ratio=4, learned=False),
    PrimitiveConfig(kind="resampler", queries=2), PrimitiveConfig(kind="text"),
]  # fmt: skip
COLS = ["draft", "accept_length", "draft_visual_tokens", "visual_reduction", "draft_prefill_ms", "tokens_per_s",
        "speedup", "vs_eagle", "identical_to_hf"]  # fmt: skip
MIX = dict(p_video=0.25, p_qa=0.35)


def _inputs(demo, n: int, seed: int, **mix) -> tuple[list, float]:
    """``n`` held-out batch-1 inputs (videos as video input where the target takes them) and their mean
    visual tokens (image and video placeholders: a Qwen video has more than an image)."""
    tgt = TargetAdapter(demo.target)
    native = tgt.video_token_id is not None
    inputs = [encode_samples(demo.processor, [s]) for s in examples(seed=seed, n=n, native_video=native, **mix)]
    return inputs, sum(int(tgt.is_visual(x["input_ids"]).sum()) for x in inputs) / n


def _rows(results: dict, hf, visual: float) -> list[dict]:
    rows = []
    eagle_s = results["eagle (none)"][0]
    for name, result in results.items():
        if name == "hf_generate":
            continue
        row = speed_row(name, result, hf)
        row["draft"] = row.pop("method")
        row["visual_reduction"] = (
            visual / max(row["draft_visual_tokens"], 1e-9) if row["draft_visual_tokens"] else "all"
        )
        row["vs_eagle"] = statistics.median(e / m for e, m in zip(eagle_s, result[0]))  # per round, as speedup
        rows.append(row)
    return rows


def primitive_table(demo, family: str, steps: int, n: int, max_new_tokens: int, repeats: int) -> list[dict]:
    """Drafts distilled for ``steps`` with each primitive (and none, and elastic), measured side by side."""
    recipe = DemoRecipe.for_family(family, seed=1)
    configs = {"eagle (none)": None}
    configs.update({p.name: CompressorConfig(primitives=(p,)) for p in PRIMITIVES})
    configs["elastic (select)"] = CompressorConfig()
    model = demo.target
    methods = {"hf_generate": hf_generate(model, max_new_tokens)}
    data = draft_data(model, demo.processor, recipe)  # the same pool and target responses for every draft
    for name, comp in configs.items():
        print(f"  distilling {name} ({steps} steps)", flush=True)
        draft, _ = distill_demo_draft(model, demo.processor, recipe, False, compressor=comp, steps=steps, data=data)
        mode = "eagle" if comp is None else "specvlm"
        methods[name] = SpecVLMEngine(model, draft, EngineConfig(mode=mode, tree=TREE))
    inputs, visual = _inputs(demo, n, 4242, **MIX)
    results = measure(methods, inputs, max_new_tokens, repeats)
    return _rows(results, results["hf_generate"], visual)


def demo_drafts(demo, n: int, max_new_tokens: int, repeats: int) -> tuple[list[dict], list[dict]]:
    """The demo's eagle vs specvlm drafts per task kind; and the gate's choices per kind."""
    model = demo.target
    methods = {
        "hf_generate": hf_generate(model, max_new_tokens),
        "eagle (none)": SpecVLMEngine(model, demo.draft, EngineConfig(mode="eagle", tree=TREE)),
        "specvlm (elastic)": SpecVLMEngine(model, demo.specvlm_draft, EngineConfig(mode="specvlm", tree=TREE)),
    }
    rows, choices = [], []
    for kind, mix in {**KINDS, "mix": MIX}.items():
        inputs, visual = _inputs(demo, n, 777, **mix)
        results = measure(methods, inputs, max_new_tokens, repeats)
        for row in _rows(results, results["hf_generate"], visual):
            rows.append({"task": kind, **row})
            print(to_markdown([rows[-1]], ["task", *COLS]).splitlines()[-1], flush=True)
        picked = Counter(s["compressor"] for s in results["specvlm (elastic)"][2])
        choices.append({"task": kind, **{k: f"{v / n:.0%}" for k, v in sorted(picked.items())}})
    return rows, choices


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="specvlm bench compressor", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="distillation steps of each per-primitive draft")
    ap.add_argument("--num", type=int, default=32, help="held-out inputs per measurement (per task kind)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the demo model is fastest on 1)")
    ap.add_argument("--skip-table", action="store_true", help="only the demo drafts' comparison")
    ap.add_argument("--family", default="llava", choices=DEMO_FAMILIES, help="which demo build to run")
    add_output_args(ap, "compressor[-<family>].md / .json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = load_demo(family=args.family)
    head = (f"greedy, batch 1, CPU ({torch.get_num_threads()} thread(s)), tree {FIXED_TREE}, max {args.max_new_tokens} "
            "new tokens; speedup = HF generate time / method time; vs_eagle = eagle time / method time")  # fmt: skip
    report, result = "", {}
    print(f"## Demo drafts ({args.family}): eagle vs specvlm (elastic), {args.num} held-out inputs per task; {head}",
          flush=True)  # fmt: skip
    rows, choices = demo_drafts(demo, args.num, args.max_new_tokens, args.repeats)
    kinds = sorted({k for c in choices for k in c} - {"task"})
    report += (f"## Demo drafts ({args.family}): eagle vs specvlm (elastic selection)\n\n{args.num} held-out "
               "inputs per task; "
               f"{head}.\n\n"
               + to_markdown(rows, ["task", *COLS]) + "\n\n### The gate's choices (share of inputs)\n\n"
               + to_markdown(choices, ["task", *kinds]) + "\n")  # fmt: skip
    result.update(demo_drafts=rows, choices=choices)
    mix = {r["draft"]: r for r in rows if r["task"] == "mix"}
    e, s = mix["eagle (none)"], mix["specvlm (elastic)"]
    summary = (f"\nOn the mix: accept length {s['accept_length']:.2f} vs eagle {e['accept_length']:.2f} "
               f"({s['accept_length'] / e['accept_length'] - 1:+.1%}; target within -3%), draft visual tokens "
               f"{s['draft_visual_tokens']:.1f} vs {e['draft_visual_tokens']:.0f} "
               f"({e['draft_visual_tokens'] / max(s['draft_visual_tokens'], 1e-9):.1f}x fewer; target >= 4x), "
               f"speed {s['vs_eagle']:.3f}x eagle (target >= 1).\n")  # fmt: skip
    print(summary, flush=True)
    report += summary
    if not args.skip_table:
        print(f"\n## Per primitive: drafts distilled {args.steps} steps each; {head}", flush=True)
        table = primitive_table(demo, args.family, args.steps, args.num, args.max_new_tokens, args.repeats)
        print(to_markdown(table, COLS), flush=True)
        report += (f"\n## Per primitive and ratio (Table 4 style)\n\nEach draft distilled {args.steps} steps (seed 1, "
                   f"same data) with one primitive; {args.num} held-out mixed inputs; {head}.\n\n"
                   + to_markdown(table, COLS) + "\n")  # fmt: skip
        result["primitives"] = table
        fixed = [r for r in table if r["draft"] not in ("eagle (none)", "elastic (select)")]
        best = max(fixed, key=lambda r: r["accept_length"])
        elastic = next(r for r in table if r["draft"] == "elastic (select)")
        line = (
            f"\nBest fixed primitive by accept length: {best['draft']} ({best['accept_length']:.2f}, "
            f"{best['speedup']:.2f}x); elastic: {elastic['accept_length']:.2f}, {elastic['speedup']:.2f}x.\n"
        )
        print(line, flush=True)
        report += line
    write_results(args.out, "compressor" if args.family == "llava" else f"compressor-{args.family}", report, result,
                  args.label)  # fmt: skip


if __name__ == "__main__":
    main()
