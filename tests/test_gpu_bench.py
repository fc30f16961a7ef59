"""The GPU engine benchmark's CPU smoke test: ``--tiny`` runs every section on a tiny model of each family and
writes its results (the full-size run needs a GPU and is not part of the tests)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_tiny_run_writes_every_section(tmp_path, family):
    torch.set_num_threads(1)
    gpu.main(["--tiny", "--family", family, "--out", str(tmp_path), "--batch-sizes", "1,3", "--max-new-tokens", "6"])
    rows = json.loads((tmp_path / "gpu.json").read_text())
    meta, rest = rows[0], rows[1:]
    assert meta["kind"] == "meta" and meta["skipped"] == [] and meta["dtype"] == "bfloat16"
    assert meta["target"] == f"tiny {family}"
    by_kind = {k: [r for r in rest if r["kind"] == k] for k in ("verify", "draft", "generate", "implied")}
    verify, drafts, gen, implied = by_kind.values()
    assert sum(map(len, by_kind.values())) == len(rest)

    assert [(r["batch"], r["nodes"]) for r in verify] == [(b, q) for b in (1, 3) for q in (1, 16, 60)]
    for r in verify:
        assert r["ms"] > 0 and 0 < r["ms_min"] <= r["ms"]
        assert r["prompt_tokens"] > 8  # bos, the image's tokens, 4+ text tokens
    assert all(r["relative"] == 1.0 for r in verify if r["nodes"] == 1)

    trees = [name for name, _ in gpu.DRAFT_TREES]
    assert [(r["batch"], r["tree"]) for r in drafts] == [(b, t) for b in (1, 3) for t in trees]
    for r in drafts:
        assert 0 < r["step_ms"] <= r["propose_ms"] and r["relative"] > 0 and r["nodes"] in (16, 60)

    assert [(r["method"], r["batch"]) for r in gen] == [("hf_generate", 1), ("ar", 1), ("hf_generate", 3), ("ar", 3)]
    for r in gen:
        assert r["new_tokens"] == 6 and r["tokens_per_s"] > 0
    for r in (r for r in gen if r["method"] == "ar"):
        assert r["prefill_ms"] > 0 and r["ms_per_step"] > 0 and r["speedup"] > 0
        assert 0 <= r["prefix_match"] <= 1 and 0 <= r["rows_identical"] <= 1

    # accept 4 and 5 per batch and tree, over one decode step and over HF generate (the ar loop's speedup)
    assert [(r["batch"], r["tree"], r["accept_length"]) for r in implied] == [
        (b, t, a) for b in (1, 3) for t in trees for a in (4.0, 5.0)
    ]
    ar = {r["batch"]: r["speedup"] for r in gen if r["method"] == "ar"}
    for r in implied:
        assert r["round_ms"] > 0 and r["speedup_vs_hf"] == pytest.approx(r["speedup_vs_step"] * ar[r["batch"]])

    md = (tmp_path / "gpu.md").read_text()
    for section in ("### Verify cost", "### Draft cost", "### Implied speedup", "### Generation", "| ar | 3 |"):
        assert section in md
