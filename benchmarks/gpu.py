"""GPU engine benchmark: a random-init Qwen2.5-VL-7B-shaped target in bf16 (or LLaVA-1.5-7B-shaped), HF generate
vs the engine's `ar` loop, the cost of verifying a tree and of a draft step relative to one decode step, and the
speedup those imply.

Run on the device machine (one H200), from the repository root, as ONE command (a few minutes with the
model build; ``--time-limit`` skips the sections left after 450 s, so it ends well inside 8 minutes):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m benchmarks.gpu --out $OUT

It needs torch with CUDA, transformers >= 5 and pydantic + pyyaml (``specvlm`` imports them); nothing is
downloaded: the model is built in code. CPU smoke test: ``python -m benchmarks.gpu --tiny --out /tmp/gpu``.

What it measures (written to ``gpu.md`` / ``gpu.json`` in ``--out``, after each section):

``--family qwen2_5_vl`` (the default): Qwen2.5-VL-7B's shape (28-layer 3584-wide decoder with GQA and M-RoPE,
32-block windowed vision tower); each prompt holds one 672 x 672 image (576 visual tokens). ``--family llava``:
LLaVA-1.5-7B's (Llama-2-7B decoder, CLIP ViT-L/14-336 tower: 576 image tokens).

1. Verify cost (``kind: verify``): one target forward (embeddings, decoder over the KV cache, LM head)
   over Q = 1, 16, 60 new tokens under a tree mask (a binary tree in heap order; the mask's shape does
   not change the work) after a ~600-token prompt (576 image tokens), at batch 1 and 16, through
   `TargetAdapter` + `SlotKVCache` as the engine's prefill and tree verify run; the cache length is
   restored after every repeat. ``relative`` = time / time at Q = 1 (one decode step): T_target(tree) /
   T_target(1) in DESIGN.md's cost model.
2. Draft cost (``kind: draft``): a random-init `EagleDraft.from_target` (one decoder layer of the target's
   family, its embedding and LM head) proposes a 16-node (top-k 4, depth 5) and a 60-node (the paper's
   top-k 10, depth 7) tree after the same prompts, through the engine's drafter (`SpecVLMEngine`, nothing
   committed); ``step_ms`` = propose time / its draft forwards, ``relative`` = step_ms / T_target(1).
   ``kind: implied`` then gives the speedup over one decode step those costs imply at accept length 4
   and 5: accept * T_target(1) / (depth * step_ms + T_target(tree)) (a round's draft forwards, the
   catch-up included, and its verify), and over HF ``generate`` (times the ``ar`` loop's speedup).
3. Generation (``kind: generate``): tokens/s of HF ``generate`` and of the engine's ``ar`` loop
   (`SpecVLMEngine.generate`), greedy, EOS disabled (every row runs ``--max-new-tokens``), same inputs,
   at batch 1 and 16, median of ``--repeats`` runs after a warm-up. ``rows_identical`` is the fraction
   of rows whose tokens equal HF's and ``prefix_match`` the mean fraction before the first difference:
   with random weights in bf16 near-tied logits can legitimately differ between the two
   implementations' kernels, so a difference is reported, not an error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import pydantic  # noqa: F401  (specvlm's configs; not in every CUDA image: fail in a second, not minutes)
except ImportError:
    sys.exit("benchmarks.gpu needs pydantic (imported by specvlm): carry its wheels (pydantic, pydantic-core, "
             "annotated-types, typing-inspection) and put them on PYTHONPATH")  # fmt: skip

from benchmarks.report import RESULTS, to_markdown, write_results  # noqa: E402
from specvlm import EngineConfig, SpecVLMEngine, TreeConfig  # noqa: E402
from specvlm.draft import EagleDraft  # noqa: E402
from specvlm.inputs import left_pad  # noqa: E402
from specvlm.target import TargetAdapter  # noqa: E402
from specvlm.tiny import (  # noqa: E402
    BOS,
    EOS,
    FIRST_TEXT,
    IMAGE,
    PAD,
    VIDEO,
    VISION_END,
    VISION_START,
    num_image_tokens,
    tiny_qwen,
    tiny_qwen_inputs,
)

GEN_COLS = ["method", "batch", "prompt_tokens", "new_tokens", "tokens_per_s", "speedup", "prefill_ms",
            "ms_per_step", "rows_identical", "prefix_match"]  # fmt: skip
VERIFY_COLS = ["batch", "nodes", "prompt_tokens", "ms", "ms_min", "relative"]
DRAFT_COLS = ["batch", "tree", "nodes", "depth", "propose_ms", "step_ms", "relative"]
IMPLIED_COLS = ["batch", "tree", "accept_length", "round_ms", "speedup_vs_step", "speedup_vs_hf"]
# the trees whose draft cost is measured: (name, config); their node counts are verified in section 1
DRAFT_TREES = [("k4-n16-d5", TreeConfig(top_k=4, total_tokens=16, depth=5)), ("paper k10-n60-d7", TreeConfig())]
TARGETS = {"qwen2_5_vl": "Qwen2.5-VL-7B-shaped Qwen2.5-VL", "llava": "LLaVA-1.5-7B-shaped LLaVA"}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def llava_config(tiny: bool):
    """LLaVA-1.5-7B's shape (Llama-2-7B decoder, CLIP ViT-L/14-336 tower: 576 image tokens), or a tiny one."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=16, patch_size=4)  # fmt: skip
        text = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14)  # fmt: skip
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    vocab_size=32064)  # fmt: skip
    vision = CLIPVisionConfig(**vision, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(
        **text, num_key_value_heads=text["num_attention_heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None,
    )  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")  # fmt: skip


def qwen_config():
    """Qwen2.5-VL-7B's shape: a 28-layer 3584-wide decoder (28 query / 4 kv heads, M-RoPE sections 16/24/24,
    rope theta 1e6) and a 32-block 1280-wide vision tower (14-pixel patches merged 2 x 2, 112-pixel attention
    windows, full attention in blocks 7, 15, 23, 31), with `specvlm.tiny`'s special token ids."""
    from transformers import AutoConfig

    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)  # fmt: skip
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")  # fmt: skip
    return AutoConfig.for_model(
        "qwen2_5_vl", text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=False,
    )  # fmt: skip


def build_target(family: str, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random init directly on ``device`` in ``dtype`` (7-8B parameters: seconds on a GPU, no CPU copy); a tiny
    Qwen2.5-VL is `specvlm.tiny.tiny_qwen`'s.

    EOS is disabled so every run is full length.
    """
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    if family == "qwen2_5_vl" and tiny:
        model = tiny_qwen("qwen2_5_vl", dtype=dtype).to(device)
    else:
        with torch.device(device):
            if family == "qwen2_5_vl":
                model = Qwen2_5_VLForConditionalGeneration._from_config(qwen_config(), dtype=dtype)
            else:
                model = LlavaForConditionalGeneration._from_config(llava_config(tiny), dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def bench_inputs(model, batch: int, text_base: int, seed: int) -> dict:
    """Left-padded prompts of one image each (text ``text_base`` + 0..9 tokens), random pixels, on the model's
    device: LLaVA ``[bos, <image> * 576, text...]``; Qwen-VL one 672 x 672 image (576 merged patches; a 16 x 16
    one on a tiny model) as `specvlm.tiny.tiny_qwen_inputs` lays it out."""
    p = next(model.parameters())
    vc, vocab = model.config.vision_config, model.config.text_config.vocab_size
    if model.config.model_type == "qwen2_5_vl":
        side = 672 if vc.patch_size == 14 else 4 * vc.patch_size
        rows = [(("image", side, side), text_base + 3 * (b % 4)) for b in range(batch)]
        inputs = tiny_qwen_inputs(model, rows, seed=seed)
        return {k: v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype)
                for k, v in inputs.items()}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g).to(device=p.device, dtype=p.dtype)
    rows = []
    for b, n in enumerate(num_image_tokens(model, pv)):
        text = torch.randint(FIRST_TEXT, vocab, (text_base + 3 * (b % 4),), generator=g).tolist()
        rows.append([BOS] + [IMAGE] * n + text)
    return {**{k: v.to(p.device) for k, v in left_pad(rows, PAD).items()}, "pixel_values": pv}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, device: torch.device, warmup: int = 1, after=None) -> tuple[list[float], object]:
    """Seconds of each of ``repeats`` calls of ``fn`` (after ``warmup`` calls), synchronized; ``after()`` runs
    outside the timing after every call. Returns the times and the last output."""
    out, times = None, []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if after is not None:
            after()
    return times, out


def tree_mask(q: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor mask ``[Q, Q]`` (self included) and depths ``[Q]`` of a ``q``-node binary tree in heap order."""
    anc = torch.eye(q, dtype=torch.bool)
    depth = torch.zeros(q, dtype=torch.long)
    for i in range(1, q):
        parent = (i - 1) // 2
        anc[i] |= anc[parent]
        depth[i] = depth[parent] + 1
    return anc.to(device), depth.to(device)


@torch.inference_mode()
def verify_cost(model, inputs: dict, nodes: list[int], repeats: int, device: torch.device) -> list[dict]:
    """Prefill the prompts as the engine does, then time one target forward (+ LM head) over each of ``nodes``
    tree sizes, restoring the cache's lengths after every call."""
    tgt = TargetAdapter(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, T = ids.shape
    prompt = tgt.prompt(ids, mask, **{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})
    kv = tgt.new_cache(B, T + max(nodes) + 1)
    kv.valid[:, :T] = mask.bool()
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None] & mask.bool()[:, None, :]  # [B, T, T]
    rope = tgt.rotary_table(kv.max_len)
    feats = tgt.forward(prompt.embeds, prompt.positions, kv.begin(T, causal), kv, rope)  # [B, T, D]
    kv.advance(T)
    root = tgt.logits(feats[:, -1]).argmax(-1)  # [B]
    pos = prompt.next_position  # [B]
    committed = kv.lengths.clone()
    g = torch.Generator().manual_seed(1)
    rows, base = [], None
    for q in nodes:
        anc, depth = tree_mask(q, device)  # [Q, Q], [Q]
        tokens = torch.randint(FIRST_TEXT, tgt.text_config.vocab_size, (B, q), generator=g).to(device)  # [B, Q]
        tokens[:, 0] = root
        positions = pos[:, None] + depth  # [B, Q]
        visible = anc.expand(B, q, q)  # [B, Q, Q]

        def step(q=q, visible=visible, tokens=tokens, positions=positions):
            m4 = kv.begin(q, visible)  # [B, 1, Q, V]
            return tgt.logits(tgt.forward(tgt.embed_tokens(tokens), positions, m4, kv, rope))  # [B, Q, V]

        times, _ = _timed(step, repeats, device, warmup=3, after=lambda: kv.lengths.copy_(committed))
        assert torch.equal(kv.lengths, committed)
        ms = statistics.median(times) * 1e3
        base = ms if base is None else base
        rows.append(dict(kind="verify", batch=B, nodes=q, prompt_tokens=T, ms=ms, ms_min=min(times) * 1e3,
                         relative=ms / base))  # fmt: skip
        log(f"verify batch {B}, {q:3d} nodes: {ms:8.2f} ms (min {min(times) * 1e3:.2f}), {ms / base:.2f}x Q=1")
    return rows


def draft_cost(model, draft, inputs: dict, step_ms: float, repeats: int, device: torch.device) -> list[dict]:
    """A random-init ``draft`` of the target's family (`EagleDraft.from_target`) proposes each of `DRAFT_TREES`
    after the prompts, through the engine (prefill and one round by `SpecVLMEngine.step`, then
    `Drafter.propose`, which commits nothing); ``step_ms``: one decode step (verify at Q = 1) at this batch."""
    B = inputs["input_ids"].shape[0]
    rows = []
    for name, tree in DRAFT_TREES:
        engine = SpecVLMEngine(model, draft, EngineConfig(mode="eagle", tree=tree))
        engine.add(**inputs)
        engine.step()  # the prompts' prefill (target and draft) and a first round: the draft's state is a round's

        def propose(engine=engine, tree=tree):
            return engine.drafter.propose(engine._root, engine._pos, tree)

        with torch.inference_mode():
            times, out = _timed(propose, repeats, device, warmup=3)
        ms = statistics.median(times) * 1e3
        step = ms / max(out.levels - 1, 1)  # the tree's draft forwards (its first level reads the last round's)
        rows.append(dict(kind="draft", batch=B, tree=name, nodes=tree.total_tokens, depth=tree.depth, propose_ms=ms,
                         step_ms=step, relative=step / step_ms))  # fmt: skip
        log(f"draft batch {B}, {name}: propose {ms:7.2f} ms, {step:.2f} ms per draft step ({step / step_ms:.2f}x "
            "a decode step)")  # fmt: skip
        del engine
    return rows


def decode_step_ms(rows: list[dict]) -> dict[int, float]:
    """Per batch size, the verify section's one-token forward (``relative`` 1: one decode step), in ms."""
    return {r["batch"]: r["ms"] for r in rows if r["kind"] == "verify" and r["relative"] == 1.0}


def implied(rows: list[dict], accepts=(4.0, 5.0)) -> list[dict]:
    """Speedups the measured costs imply (`draft_cost`): per batch and draft tree, a round costs ``depth`` draft
    steps (the tree's and the catch-up) and one verify of the tree's nodes; it emits ``accept`` tokens where a
    decode step emits one. Over HF ``generate``: times the ``ar`` loop's own speedup at that batch."""
    verify = {(r["batch"], r["nodes"]): r["ms"] for r in rows if r["kind"] == "verify"}
    base = decode_step_ms(rows)
    ar = {r["batch"]: r["speedup"] for r in rows if r["kind"] == "generate" and r["method"] == "ar"}
    out = []
    for d in (r for r in rows if r["kind"] == "draft"):
        B, tv = d["batch"], verify.get((d["batch"], d["nodes"]))
        if tv is None or B not in base:
            continue
        round_ms = d["depth"] * d["step_ms"] + tv
        for a in accepts:
            vs_step = a * base[B] / round_ms
            out.append(dict(kind="implied", batch=B, tree=d["tree"], accept_length=a, round_ms=round_ms,
                            speedup_vs_step=vs_step, speedup_vs_hf=vs_step * ar[B] if B in ar else None))  # fmt: skip
    return out


def _agreement(ours: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    """Fraction of rows identical, and mean fraction of each row before its first difference."""
    prefix = []
    for a, b in zip(ours, ref):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(b), 1))
    return sum(a == b for a, b in zip(ours, ref)) / len(ref), statistics.mean(prefix)


def generation(model, inputs: dict, max_new_tokens: int, repeats: int, device: torch.device) -> list[dict]:
    """HF generate vs the engine's ``ar`` loop on the same inputs, greedy, full length."""
    B, T = inputs["input_ids"].shape
    tokens = B * max_new_tokens

    placeholders = TargetAdapter(model).placeholder_ids.tolist()

    def hf():
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                              suppress_tokens=placeholders, pad_token_id=PAD)  # fmt: skip

    times, out = _timed(hf, repeats, device)
    hf_s = statistics.median(times)
    ref = out[:, T:].tolist()
    rows = [dict(kind="generate", method="hf_generate", batch=B, prompt_tokens=T, new_tokens=max_new_tokens,
                 tokens_per_s=tokens / hf_s, speedup=1.0, seconds=hf_s)]  # fmt: skip
    log(f"hf_generate batch {B}: {tokens / hf_s:8.1f} tokens/s ({hf_s:.2f} s per run)")
    engine = SpecVLMEngine(model, None, EngineConfig(mode="ar"))
    times, res = _timed(lambda: engine.generate(**inputs, max_new_tokens=max_new_tokens), repeats, device)
    sec = statistics.median(times)
    n = sum(len(s) for s in res.sequences)
    same, prefix = _agreement(res.sequences, ref)
    st = res.stats
    steps = statistics.mean(s["verify_ms"] / max(s["target_forwards"] - 1, 1) for s in st)
    rows.append(dict(kind="generate", method="ar", batch=B, prompt_tokens=T, new_tokens=max_new_tokens,
                     tokens_per_s=n / sec, speedup=(n / sec) / (tokens / hf_s), seconds=sec,
                     prefill_ms=statistics.mean(s["prefill_ms"] for s in st), ms_per_step=steps,
                     rows_identical=same, prefix_match=prefix))  # fmt: skip
    log(f"ar          batch {B}: {n / sec:8.1f} tokens/s ({sec:.2f} s per run), {rows[-1]['speedup']:.2f}x HF, "
        f"{steps:.2f} ms/step, rows identical {same:.2f}, prefix match {prefix:.2f}")  # fmt: skip
    return rows


def report(meta: dict, rows: list[dict]) -> str:
    head = (
        f"## GPU engine benchmark: random-init {meta['target']} ({meta['params_b']:.2f}B parameters, "
        f"{meta['dtype']}) on {meta['device_name']}\n\n"
        f"torch {meta['torch']}, transformers {meta['transformers']}; model built in {meta['build_s']:.1f} s; "
        + (f"peak GPU memory {meta['peak_gib']:.1f} GiB; " if meta["peak_gib"] else "")
        + f"total {meta['total_s']:.1f} s"
        + (f"; skipped (time limit): {', '.join(meta['skipped'])}" if meta["skipped"] else "")
    )
    ver = [r for r in rows if r["kind"] == "verify"]
    gen = [r for r in rows if r["kind"] == "generate"]
    drafts = [r for r in rows if r["kind"] == "draft"]
    parts = [head]
    if ver:
        parts.append("### Verify cost: one target forward over Q tree nodes after the prompt, relative to Q = 1\n\n"
                     + to_markdown(ver, VERIFY_COLS))  # fmt: skip
    if drafts:
        parts.append("### Draft cost: a random-init draft of the target's family proposing a tree; step_ms per "
                     "draft forward, relative to one decode step (Q = 1)\n\n"
                     + to_markdown(drafts, DRAFT_COLS))  # fmt: skip
        parts.append("### Implied speedup: accept * T(Q=1) / (depth * step_ms + T(Q=nodes)); vs HF = that * the "
                     "ar loop's speedup\n\n" + to_markdown(implied(rows), IMPLIED_COLS))  # fmt: skip
    if gen:
        parts.append(f"### Generation: HF generate vs the engine's ar loop, greedy, EOS off, median of "
                     f"{meta['repeats']} runs\n\n" + to_markdown(gen, GEN_COLS))  # fmt: skip
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (smoke test)")
    ap.add_argument("--family", default="qwen2_5_vl", choices=sorted(TARGETS), help="the target's shape")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    ap.add_argument("--nodes", default="1,16,60", help="tree sizes to verify, comma-separated; the first is the base")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (8 with --tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 3; 20 for verify)")
    ap.add_argument("--time-limit", type=float, default=450.0, help="seconds; later sections are skipped after it")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu.md / gpu.json")
    args = ap.parse_args(argv)
    global T0
    T0 = time.perf_counter()  # the time limit counts from here (imports excluded)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or pass --tiny (CPU smoke test)")
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    nodes = [int(q) for q in args.nodes.split(",")]
    max_new = args.max_new_tokens or (8 if args.tiny else 128)
    gen_repeats = args.repeats or (1 if args.tiny else 3)
    ver_repeats = args.repeats or (2 if args.tiny else 20)
    text_base = 4 if args.tiny else 24  # ~600-token prompts with 576 image tokens

    target = f"tiny {args.family}" if args.tiny else TARGETS[args.family]
    log(f"building a {target} target on {device} in {args.dtype}")
    t = time.perf_counter()
    model = build_target(args.family, args.tiny, device, dtype)
    _sync(device)
    import transformers

    meta = dict(
        kind="meta", target=target, dtype=args.dtype,
        params_b=sum(p.numel() for p in model.parameters()) / 1e9, build_s=time.perf_counter() - t,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        torch=torch.__version__, transformers=transformers.__version__, repeats=gen_repeats,
        verify_repeats=ver_repeats, max_new_tokens=max_new, skipped=[], peak_gib=0.0, total_s=0.0,
    )  # fmt: skip
    log(f"built {meta['params_b']:.2f}B parameters in {meta['build_s']:.1f} s")
    rows: list[dict] = []

    def save():
        if device.type == "cuda":
            meta["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        meta["total_s"] = time.perf_counter() - T0
        write_results(args.out, "gpu", report(meta, rows), [meta, *rows, *implied(rows)])

    sections = [(kind, B) for kind in ("verify", "draft", "generate") for B in batches]
    draft = None
    for section, B in sections:
        name = f"{section} batch {B}"
        if time.perf_counter() - T0 > args.time_limit:
            log(f"skipping {name}: past the {args.time_limit:.0f} s time limit")
            meta["skipped"].append(name)
            continue
        log(f"{name} ...")
        inputs = bench_inputs(model, B, text_base, seed=B)
        if section == "verify":
            rows += verify_cost(model, inputs, nodes, ver_repeats, device)
        elif section == "draft":
            base = decode_step_ms(rows).get(B)
            if base is None:
                log(f"skipping {name}: no decode-step time at batch {B}")
                meta["skipped"].append(name)
                continue
            if draft is None:  # built once, outside inference mode
                draft = EagleDraft.from_target(model, seed=0)
            rows += draft_cost(model, draft, inputs, base, ver_repeats, device)
        else:
            rows += generation(model, inputs, max_new, gen_repeats, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    save()
    print(report(meta, rows))


if __name__ == "__main__":
    main()
