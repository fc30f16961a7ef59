"""The Ray Train distillation job: config validation, and a real 2-worker run that checkpoints and resumes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.distill import DistillJobConfig
from pipelines.distill_data import ManifestData
from specvlm.config import ConfigError, load_config, parse_config
from specvlm.demo.world import IMAGE_SIZE

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", ["distill-demo.yaml", "distill-demo-specvlm.yaml", "distill-llava-1.5-7b.yaml"])
def test_example_configs_validate_and_print_config_loads_back_equal(name, tmp_path, capsys):
    """Every example validates; ``--print-config`` prints it with every default, and that YAML loads back equal."""
    from pipelines.distill import main

    cfg = load_config(CONFIGS / name, DistillJobConfig)
    assert main(["--config", str(CONFIGS / name), "--print-config"]) == 0
    printed = tmp_path / "full.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed, DistillJobConfig) == cfg
    assert set(yaml.safe_load(printed.read_text())) == set(DistillJobConfig.model_fields)


def test_demo_config_sets_nothing_and_print_config_applies_flags(capsys):
    from pipelines.distill import main

    assert load_config(CONFIGS / "distill-demo.yaml", DistillJobConfig) == DistillJobConfig()
    assert main(["--print-config", "--workers", "3", "--output", "runs/x"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert parse_config(printed, DistillJobConfig) == DistillJobConfig(workers=3, output="runs/x")


def test_specvlm_demo_config_validates():
    cfg = load_config(CONFIGS / "distill-demo-specvlm.yaml", DistillJobConfig)
    assert cfg.mode == "specvlm" and cfg.compressor.mode == "select"
    from specvlm.demo.recipe import DemoRecipe

    assert cfg.compressor == DemoRecipe().compressor()  # the same elastic set as `make demo-model`


def test_llava_config_validates():
    cfg = load_config(CONFIGS / "distill-llava-1.5-7b.yaml", DistillJobConfig)
    assert isinstance(cfg.data, ManifestData) and cfg.use_gpu
    assert cfg.model.target.startswith("s3://") and cfg.model.dtype == "bfloat16" and cfg.model.draft is None
    assert cfg.lr == 8e-5 and cfg.weight_decay == 0.0
    assert cfg.workers * cfg.batch_size == 128  # the paper's batch
    assert (cfg.tree.top_k, cfg.tree.total_tokens, cfg.tree.depth) == (10, 60, 7)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"lr": 0}, "lr"),
        ({"bogus": 1}, "bogus"),
        ({"response_source": "teacher"}, "response_source"),
        ({"data": {"source": "manifest"}}, "data.manifest.path"),
        ({"data": {"source": "manifest", "path": "rows.csv"}}, "data.manifest.path"),
        ({"data": {"source": "web"}}, "data"),
        ({"data": {"source": "demo", "p_video": 0.8, "p_qa": 0.5}}, "data.demo"),
        ({"tree": {"top_k": 2, "total_tokens": 60, "depth": 2}}, "tree"),
        ({"output": "s3://bucket/run"}, "output"),
        ({"workers": 0}, "workers"),
        ({"model": {"target": "demo", "bogus": 1}}, "model.bogus"),
        ({"model": {"device": "cuda:0"}}, "(top level)"),
        ({"target": "demo"}, "(top level)"),
    ],
)
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError, match=rf"(?m)^  {re.escape(field)}(\.| *:)"):
        parse_config(data, DistillJobConfig, source="job.yaml")


def test_main_reports_bad_config(tmp_path, capsys):
    from pipelines.distill import main

    bad = tmp_path / "job.yaml"
    bad.write_text(yaml.safe_dump({"batch_size": -1}))
    with pytest.raises(SystemExit, match="batch_size"):
        main(["--config", str(bad)])
    with pytest.raises(SystemExit, match="max_steps"):
        main(["--max-steps", "0"])
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"model": {"target": str(tmp_path / "none")}}))
    with pytest.raises(SystemExit, match=r"specvlm distill: model.target .*none does not exist"):
        main(["--config", str(missing)])  # before Ray starts
    missing.write_text(yaml.safe_dump({"model": {"draft": "demo"}}))
    with pytest.raises(SystemExit, match="not 'demo'"):
        main(["--config", str(missing)])


# ----------------------------------------------------------------------------- Ray Train end to end
@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory):
    """A tiny random LLaVA saved with the demo processor, loadable by `specvlm.loading.load_target`."""
    from specvlm.demo import build_processor
    from specvlm.tiny import tiny_llava

    processor = build_processor(image_size=64, patch_size=8)
    model = tiny_llava(vocab=64, image_size=64, patch=8, hidden=64, layers=2)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>") == 3
    assert len(processor.tokenizer) == model.config.text_config.vocab_size
    path = tmp_path_factory.mktemp("tiny-target")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL saved with its Qwen processor (`specvlm.tiny.save_tiny_qwen`)."""
    from specvlm.tiny import save_tiny_qwen

    return save_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"), "qwen2_5_vl")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A .jsonl manifest of ShapesWorld PNGs (relative paths) with two bad rows first."""
    from specvlm.demo import ShapesWorld

    root = tmp_path_factory.mktemp("manifest")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [
        {"image": "broken.png", "prompt": "describe the image.", "response": "a red circle"},
        {"image": "ok-0.png", "prompt": "describe the image.", "response": ""},
    ]
    world = ShapesWorld(7)
    for i in range(10):
        s = world.sample(p_video=0.0)
        s["image"].save(root / f"ok-{i}.png")
        rows.append({"image": f"ok-{i}.png", "prompt": s["prompt"], "response": s["response"]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _steps(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ray_train_run_checkpoints_skips_bad_rows_and_resumes(ray_local, tiny_target_dir, manifest, tmp_path):
    from pipelines.distill import run
    from specvlm import EagleDraft

    output = tmp_path / "out"
    job = {
        "model": {"target": str(tiny_target_dir)},
        "data": {"source": "manifest", "path": str(manifest)},
        "max_steps": 4,
        "batch_size": 2,
        "lr": 1e-3,
        "workers": 2,
        "checkpoint_every": 2,
        "eval_every": 4,
        "eval_samples": 1,
        "eval_max_new_tokens": 4,
        "tree": {"top_k": 2, "total_tokens": 4, "depth": 2},
        "output": str(output),
        "max_failures": 0,
    }
    final = run(parse_config(job, DistillJobConfig))

    first = _steps(output)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    for key in ("loss", "loss_logit", "loss_feat", "draft_top1", "skipped_rows"):
        assert all(isinstance(r[key], (int, float)) for r in first), key
    assert "accept_length" in first[-1] and first[-1]["accept_length"] >= 1.0
    assert first[-1]["skipped_rows"] >= 1  # the broken PNG and/or the empty response
    assert final == output.resolve() / "draft"
    EagleDraft.from_pretrained(final)
    checkpoints = sorted((output / "ray" / "distill").glob("checkpoint_0*"))
    assert [c.name for c in checkpoints] == ["checkpoint_00000002", "checkpoint_00000004"]
    assert json.loads((checkpoints[-1] / "state.json").read_text())["step"] == 4
    EagleDraft.from_pretrained(checkpoints[-1] / "draft")

    # same storage path + name, more steps, the target's own responses: continues at step 5
    run(parse_config({**job, "max_steps": 6, "response_source": "target", "response_max_new_tokens": 6},
                     DistillJobConfig))  # fmt: skip
    second = _steps(output)[len(first) :]
    assert [r["step"] for r in second] == [5, 6]
    assert second[-1]["skipped_rows"] >= first[-1]["skipped_rows"]
    assert json.loads((output / "ray" / "distill" / "checkpoint_00000006" / "state.json").read_text())["step"] == 6


@pytest.mark.slow
def test_from_output_trains_on_a_caption_jobs_own_rows(ray_local, tiny_target_dir, manifest, tmp_path, capsys):
    """``specvlm distill --from-output OUT``: a caption output's captioned rows are the training rows (uri,
    prompt, caption as the response); error rows are left out, unreadable media are skipped rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.captioner import OUTPUT_SCHEMA
    from pipelines.distill import main

    src = [json.loads(line) for line in manifest.read_text().splitlines()][2:]  # the good rows
    rows = [{"id": r["image"], "uri": str(manifest.parent / r["image"]), "prompt": r["prompt"],
             "caption": r["response"]} for r in src]  # fmt: skip
    rows += [{"id": "bad.png", "uri": "bad.png", "prompt": "describe the image.", "error": "decode: bad"},
             {"id": "clip.mp4", "uri": str(tmp_path / "clip.mp4"), "prompt": "describe the video.",
              "caption": "a clip"}]  # fmt: skip
    out = tmp_path / "captions"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), out / "run-0.parquet")
    (out / "_summary.json").write_text("{}")
    output = tmp_path / "distill"
    argv = ["--from-output", str(out), "--max-steps", "2", "--output", str(output), "--workers", "1"]
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "source: caption_output" in printed and "response_source: dataset" in printed
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"model": {"target": str(tiny_target_dir)}, "batch_size": 4, "eval_samples": 0,
                               "checkpoint_every": 2, "max_failures": 0}))  # fmt: skip
    assert main([*argv, "--config", str(job)]) == 0
    steps = _steps(output)
    assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] > 0 for r in steps)
    with pytest.raises(SystemExit, match="max_steps"):
        main(["--from-output", str(out), "--config", str(job), "--print-config", "--max-steps", "0"])


@pytest.mark.slow
def test_ray_train_specvlm_mode_trains_the_compressor(ray_local, tiny_qwen_dir, manifest, tmp_path):
    """mode specvlm on a Qwen2.5-VL target (M-RoPE positions, native-resolution grids): DDP over draft +
    compressor + gate (unused primitives allowed), gate stats logged, the target's own responses, the final
    draft carries the compressor, and the held-out accept length comes from a specvlm engine."""
    from pipelines.distill import run
    from specvlm import EagleDraft

    output = tmp_path / "out"
    job = {
        "model": {"target": str(tiny_qwen_dir)}, "data": {"source": "manifest", "path": str(manifest)},
        "mode": "specvlm", "response_source": "target", "response_max_new_tokens": 6,
        "compressor": {"primitives": [{"kind": "pool", "ratio": 4}, {"kind": "resampler"}, {"kind": "text"}],
                       "cost_weight": 0.05},
        "max_steps": 2, "batch_size": 2, "workers": 2, "checkpoint_every": 2, "eval_every": 2, "eval_samples": 1,
        "eval_max_new_tokens": 4, "tree": {"top_k": 2, "total_tokens": 4, "depth": 2}, "output": str(output),
        "max_failures": 0,
    }  # fmt: skip
    final = run(parse_config(job, DistillJobConfig))
    steps = _steps(output)
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert set(r["compressor_choices"]) == {"pool4", "resampler2", "text"}
        assert sum(r["compressor_choices"].values()) >= 1 and 0 <= r["draft_visual_tokens"] <= 64
    assert steps[-1]["accept_length"] >= 1.0
    draft = EagleDraft.from_pretrained(final)
    assert draft.compressor is not None and draft.compressor.names == ["pool4", "resampler2", "text"]
    assert draft.compressor.config.cost_weight == 0.05


def test_demo_data_rows_hold_png_bytes(ray_local):
    """The demo source: ShapesWorld rows with PNG bytes in a Ray Dataset, held-out rows from another seed."""
    from pipelines.distill_data import build_datasets
    from specvlm.distill import sample_from_row

    cfg = parse_config({"data": {"source": "demo", "num_samples": 3}, "eval_samples": 2}, DistillJobConfig)
    train, eval_rows, base = build_datasets(cfg.data, need_response=False, n_eval=2)
    rows = train.take_all()
    assert len(rows) == 3 and len(eval_rows) == 2 and base is None
    assert rows[0]["image"].startswith(b"\x89PNG") and rows[0]["image"] != eval_rows[0]["image"]
    sample = sample_from_row(rows[0])
    assert sample["image"].size == (IMAGE_SIZE, IMAGE_SIZE) and sample["response"] == rows[0]["response"]


def test_demo_target_is_the_shipped_build_on_an_empty_cache_with_a_fresh_draft(tmp_path, monkeypatch):
    from pipelines.distill import load_models

    monkeypatch.setenv("SPECVLM_HOME", str(tmp_path))
    model, processor, draft = load_models(DistillJobConfig(draft_intermediate_size=32, seed=3))
    assert model.config.text_config.hidden_size == 256 and next(model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert processor.tokenizer.padding_side == "left"
    assert draft.config.intermediate_size == 32 and draft.compressor is None  # fresh, not the demo's trained draft


def test_a_trained_draft_continues_in_specvlm_mode_with_a_fresh_compressor(tiny_target_dir, tmp_path):
    """model.draft: a saved eagle draft starts a specvlm run (compressor added, seeded); a draft for another
    target is refused by `EagleDraft.check_fits` before anything trains."""
    from pipelines.distill import load_models
    from specvlm import EagleDraft
    from specvlm.tiny import tiny_llava

    model, _, fresh = load_models(DistillJobConfig(model={"target": str(tiny_target_dir)}))
    fresh.save_pretrained(tmp_path / "eagle")
    job = {"model": {"target": str(tiny_target_dir), "draft": str(tmp_path / "eagle")}, "mode": "specvlm",
           "compressor": {"primitives": [{"kind": "pool", "ratio": 4}]}}  # fmt: skip
    _, _, a = load_models(parse_config(job, DistillJobConfig))
    _, _, b = load_models(parse_config(job, DistillJobConfig))
    assert a.compressor.names == ["pool4"] and torch.equal(a.fc.weight, fresh.fc.weight)
    assert all(
        torch.equal(x, y) for x, y in zip(a.compressor.state_dict().values(), b.compressor.state_dict().values())
    )
    EagleDraft.from_target(tiny_llava(hidden=32, layers=1)).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match="draft hidden size 32 != target's 64"):
        load_models(DistillJobConfig(model={"target": str(tiny_target_dir), "draft": str(tmp_path / "narrow")}))
