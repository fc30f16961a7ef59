"""The GPU engine benchmark's CPU smoke test: ``--tiny`` runs every section on a tiny LLaVA and writes its
results (the full-size run needs a GPU and is not part of the tests)."""

from __future__ import annotations

import json

import torch

from benchmarks import gpu


def test_tiny_run_writes_every_section(tmp_path):
    torch.set_num_threads(1)
    gpu.main(["--tiny", "--out", str(tmp_path), "--batch-sizes", "1,3", "--max-new-tokens", "6"])
    rows = json.loads((tmp_path / "gpu.json").read_text())
    meta, rest = rows[0], rows[1:]
    assert meta["kind"] == "meta" and meta["skipped"] == [] and meta["dtype"] == "bfloat16"
    verify = [r for r in rest if r["kind"] == "verify"]
    gen = [r for r in rest if r["kind"] == "generate"]
    assert len(verify) + len(gen) == len(rest)

    assert [(r["batch"], r["nodes"]) for r in verify] == [(b, q) for b in (1, 3) for q in (1, 16, 60)]
    for r in verify:
        assert r["ms"] > 0 and 0 < r["ms_min"] <= r["ms"]
        assert r["prompt_tokens"] > 16  # bos + 16 image tokens + text
    assert all(r["relative"] == 1.0 for r in verify if r["nodes"] == 1)

    assert [(r["method"], r["batch"]) for r in gen] == [("hf_generate", 1), ("ar", 1), ("hf_generate", 3), ("ar", 3)]
    for r in gen:
        assert r["new_tokens"] == 6 and r["tokens_per_s"] > 0
    for r in (r for r in gen if r["method"] == "ar"):
        assert r["prefill_ms"] > 0 and r["ms_per_step"] > 0 and r["speedup"] > 0
        assert 0 <= r["prefix_match"] <= 1 and 0 <= r["rows_identical"] <= 1

    md = (tmp_path / "gpu.md").read_text()
    assert "### Verify cost" in md and "### Generation" in md and "| ar | 3 |" in md
