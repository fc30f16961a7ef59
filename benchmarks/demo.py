"""Demo-model benchmark: speculative decoding vs the target's own HF generate, side by side.

Run with ``make bench`` / ``specvlm bench demo`` / ``python -m benchmarks.demo``.

1. Speed (greedy, batch 1, CPU): for held-out ShapesWorld questions (image
   captions, QA, 4-frame videos) the target's HF ``generate``, HF's own
   speculation (``generate(prompt_lookup_num_tokens=10)``, prompt lookup),
   the engine's ``ar`` loop, ``eagle`` with a few tree shapes and ``specvlm``
   (the draft with the elastic visual compressor), all on the same inputs in
   one process, interleaved. Reports tokens/s and speedup over HF generate
   as the median of ``--repeats`` rounds with their range, accept length,
   the time split, and whether the tokens are identical to HF's.
   ``--family qwen2_5_vl`` runs the Qwen2.5-VL demo (videos as video input).
2. Training-time scaling (SpecVLM paper §4: longer online distillation ->
   longer accepted runs): a fresh draft is distilled on the demo target and
   its real accept length measured every few steps; the curve is written to
   ``docs/accept_vs_steps.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import add_output_args, to_markdown, write_results
from specvlm import EngineConfig, SpecVLMEngine, TreeConfig
from specvlm.config import CPU_TREE, TREE_PRESETS
from specvlm.demo import load_demo
from specvlm.demo.recipe import DEMO_FAMILIES, DemoRecipe, distill_demo_draft, examples
from specvlm.distill import encode_samples, evaluate_accept_length
from specvlm.engine import pooled_accept_length
from specvlm.target import TargetAdapter

ROOT = Path(__file__).resolve().parent.parent
TREES = {
    "k2-n14-d8": TreeConfig(top_k=2, total_tokens=14, depth=8),
    "k2-n14-d8 bounded": CPU_TREE,
    "k2-n18-d12 bounded": TREE_PRESETS["cpu-deep"],
    "paper k10-n60-d7": TreeConfig(),
}
# The trees compared: the CPU tree's shape without its confidence bounds (FIXED_TREE, what the compressor benchmark
# runs), the CPU tree itself (specvlm.config.CPU_TREE), the deeper CPU preset (tree: cpu-deep), and the paper's
# GPU tree
FIXED_TREE = "k2-n14-d8"
CPU_TREE_NAME = "k2-n14-d8 bounded"
# specvlm (the elastic compressor draft) runs on the fixed tree, where both drafts verify the same nodes so accept
# lengths compare the drafts alone, and on the CPU default, where each draft's confidence sizes its own trees
SPECVLM_TREES = (FIXED_TREE, CPU_TREE_NAME)
COLS = ["task", "method", "tokens", "tokens_per_s", "speedup", "speedup_range", "accept_length", "nodes_per_round",
        "draft_visual_tokens", "prefill_ms", "draft_prefill_ms", "draft_ms", "verify_ms",
        "identical_to_hf"]  # fmt: skip
PROMPT_LOOKUP = 10  # HF generate's prompt_lookup_num_tokens: the speculation a user gets for free


KINDS = {
    "caption": dict(p_video=0.0, p_qa=0.0),
    "video": dict(p_video=1.0, p_qa=0.0),
    "qa": dict(p_video=0.0, p_qa=1.0),
}


def hf_generate(model, max_new_tokens: int, **kw):
    """The target's own HF ``generate`` (greedy, image and video placeholders suppressed; ``kw``: more
    generate options, e.g. ``prompt_lookup_num_tokens``) as a method for `measure`."""
    placeholders = TargetAdapter(model).placeholder_ids.tolist()
    eos = model.generation_config.eos_token_id

    def run(enc):
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=placeholders,
                             **kw)  # fmt: skip
        seq = out[0, enc["input_ids"].shape[1] :].tolist()
        return (seq[: seq.index(eos) + 1] if eos in seq else seq), None

    return run


def measure(methods: dict, inputs: list, max_new_tokens: int, rounds: int) -> dict:
    """Run every method (an engine, or a callable ``enc -> (tokens, stats)``) over the same batch-1 inputs.

    Returns ``name -> (round_seconds, sequences, stats)``: ``rounds`` rounds (after one warm-up call
    each), every round runs each input through every method back to back (interleaved, the order
    rotating per round so no method always runs first), and ``round_seconds[r]`` sums a method's
    times in round r. Greedy: every round gives the same tokens.
    """

    def call(method, enc):
        if not isinstance(method, SpecVLMEngine):
            return method(enc)
        out = method.generate(**enc, max_new_tokens=max_new_tokens)
        return out.sequences[0], out.stats[0]

    for method in methods.values():
        call(method, inputs[0])  # warm-up
    names = list(methods)
    secs = {name: [0.0] * rounds for name in names}
    out = {name: ([], []) for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for enc in inputs:
            for name in order:
                t0 = time.perf_counter()
                tokens, stats = call(methods[name], enc)
                secs[name][r] += time.perf_counter() - t0
                if r == 0:
                    out[name][0].append(tokens)
                    out[name][1].append(stats)
    return {name: (secs[name], *out[name]) for name in names}


def speed_row(name: str, result, hf_result, **extra) -> dict:
    """One table row: median tokens/s and speedup over HF generate across rounds (each round's speedup
    from the same round's HF time) with the speedup's range, mean stats, and whether the tokens equal HF's."""
    secs, seqs, stats = result
    n_tok = sum(len(s) for s in seqs)
    ratios = [h / m for h, m in zip(hf_result[0], secs)]
    row = dict(**extra, method=name, tokens=n_tok, tokens_per_s=statistics.median(n_tok / t for t in secs),
               speedup=statistics.median(ratios), speedup_range=f"{min(ratios):.2f}-{max(ratios):.2f}",
               identical_to_hf=seqs == hf_result[1])  # fmt: skip
    if stats[0] is not None:
        keys = ("prefill_ms", "draft_prefill_ms", "draft_ms", "verify_ms", "draft_visual_tokens")
        row.update({k: statistics.mean(s[k] for s in stats) for k in keys})
        row["accept_length"] = pooled_accept_length(stats)
        rounds = sum(s["target_forwards"] - 1 for s in stats)
        if any(s["tree_nodes"] for s in stats):  # tree nodes verified per round, roots included
            row["nodes_per_round"] = sum(s["tree_nodes"] for s in stats) / rounds
    return row


def speed(demo, n: int = 16, max_new_tokens: int = 48, repeats: int = 3, device: str = "cpu",
          native_video: bool = False) -> list[dict]:  # fmt: skip
    """Per task kind and method: tokens/s over ``n`` held-out inputs at batch 1 (see `measure`)."""
    proc, model = demo.processor, demo.target
    methods = {
        "hf_generate": hf_generate(model, max_new_tokens),
        f"hf_generate prompt_lookup={PROMPT_LOOKUP}": hf_generate(
            model, max_new_tokens, prompt_lookup_num_tokens=PROMPT_LOOKUP
        ),
        "ar": SpecVLMEngine(model, None, EngineConfig(mode="ar")),
    }
    for name, tree in TREES.items():
        methods[f"eagle {name}"] = SpecVLMEngine(model, demo.draft, EngineConfig(mode="eagle", tree=tree))
    for name in SPECVLM_TREES:
        methods[f"specvlm {name}"] = SpecVLMEngine(
            model, demo.specvlm_draft, EngineConfig(mode="specvlm", tree=TREES[name])
        )
    rows = []
    for kind, mix in KINDS.items():
        samples = examples(seed=777, n=n, native_video=native_video, **mix)
        inputs = [encode_samples(proc, [s]).to(device) for s in samples]
        results = measure(methods, inputs, max_new_tokens, repeats)
        for name, result in results.items():
            rows.append(speed_row(name, result, results["hf_generate"], task=kind))
            print(to_markdown([rows[-1]], COLS).splitlines()[-1], flush=True)
    return rows


def accept_vs_steps(demo, steps: int = 400, eval_at=(0, 25, 50, 100, 200, 300, 400), n_eval: int = 16) -> list[dict]:
    """Distil a fresh draft on the demo target; measure real accept length at ``eval_at`` steps."""
    tree = TreeConfig(top_k=4, total_tokens=16, depth=5)
    held_out = [encode_samples(demo.processor, [s]) for s in examples(seed=4242, n=n_eval, p_video=0.25, p_qa=0.35)]
    curve = []

    def on_step(step: int, draft) -> None:
        if step in eval_at:
            draft.eval()
            eng = SpecVLMEngine(demo.target, draft, EngineConfig(mode="eagle", tree=tree))
            acc = evaluate_accept_length(eng, held_out)
            curve.append({"step": step, "accept_length": acc})
            print(f"  step {step}: accept length {acc:.2f}", flush=True)

    recipe = DemoRecipe(draft_steps=steps, seed=1)
    distill_demo_draft(demo.target, demo.processor, recipe, progress=False, on_step=on_step)
    return curve


def plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([c["step"] for c in curve], [c["accept_length"] for c in curve], marker="o")
    ax.set_xlabel("distillation steps (batch 16)")
    ax.set_ylabel("accept length (tokens / target forward)")
    ax.set_title("Demo draft: accept length vs training steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="specvlm bench demo", description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=16, help="held-out inputs per task kind for the speed table")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; tables quote their median and range")
    ap.add_argument("--family", default="llava", choices=DEMO_FAMILIES, help="which demo build to run")
    ap.add_argument("--curve-steps", type=int, default=400, help="0 skips the accept-vs-steps curve")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every method (a model this small runs fastest on 1)",
    )
    ap.add_argument("--device", default="cpu", help="torch device for every method (e.g. cuda)")
    add_output_args(ap, "demo[-<family>].md / .json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = load_demo(family=args.family)
    native_video = args.family != "llava"
    where = f"CPU ({torch.get_num_threads()} thread(s))"
    if args.device != "cpu":
        for model in (demo.target, demo.draft, demo.specvlm_draft):
            model.to(args.device)
        where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
        args.curve_steps = 0  # the training curve is a CPU figure
    header = (
        f"## Demo model ({args.family}): greedy, batch 1, {where}, {args.num} held-out inputs per task, max "
        f"{args.max_new_tokens} new tokens; speedup = HF generate time / method time, median of {args.repeats} "
        "interleaved rounds (range)"
    )
    print(header, flush=True)
    print("| " + " | ".join(COLS) + " |", flush=True)
    rows = speed(demo, args.num, args.max_new_tokens, args.repeats, args.device, native_video)
    table = to_markdown(rows, COLS)
    report = header + "\n\n" + table + "\n"
    result = {"speed": rows}
    if args.family != "llava":
        args.curve_steps = 0  # the training curve is the LLaVA demo's figure
    if args.curve_steps:
        print("\n## Accept length vs distillation steps (fresh draft, seed 1)", flush=True)
        at = tuple(s for s in (0, 25, 50, 100, 200, 300, 400, 600, 800) if s <= args.curve_steps)
        curve = accept_vs_steps(demo, args.curve_steps, at)
        plot(curve, ROOT / "docs" / "accept_vs_steps.png")
        report += "\n## Accept length vs distillation steps\n\n" + to_markdown(curve, ["step", "accept_length"]) + "\n"
        result["accept_vs_steps"] = curve
        print(f"wrote {ROOT / 'docs' / 'accept_vs_steps.png'}")
    name = "demo" if args.family == "llava" else f"demo-{args.family}"
    name = name if args.device == "cpu" else f"{name}-{torch.device(args.device).type}"  # CPU results stay
    write_results(args.out, name, report, result, args.label)


if __name__ == "__main__":
    main()
