"""Ray Data batch captioning: config and CLI, the CPU stages and the Captioner called directly (no cluster),
then real jobs on the session's Ray cluster: bad-input corpus, resume, a killed actor."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from caption_inputs import CORPUS_IGNORED, corpus, encode_video, save, shapes, shapes_video, write_shard
from PIL import Image

from pipelines import caption_io as cio
from pipelines.caption import CaptionJobConfig, parse_args, resource_warning, run
from specvlm import storage
from specvlm.config import ConfigError, EngineConfig, ModelConfig, SamplingConfig, load_config, parse_config
from specvlm.demo.world import IMAGE_SIZE
from specvlm.media import MediaError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
OPTS = cio.DecodeOptions()


@pytest.fixture(scope="module")
def demo_paths(small_demo):
    """ModelConfig fields pointing at the small demo's folders (workers need no SPECVLM_HOME)."""
    demo, _ = small_demo
    return {"target": str(demo.path / "target"), "draft": str(demo.path / "draft")}


def job(demo_paths, src, out, **kw) -> CaptionJobConfig:
    data = {"input": str(src), "output": str(out), "model": demo_paths, "sampling": {"max_new_tokens": 12},
            "batch_size": 4, "rows_per_file": 4, "decode_batch_size": 4, **kw}  # fmt: skip
    return parse_config(data, CaptionJobConfig)


def ids_of(out) -> list[str]:
    return cio.read_output(str(out), columns=["id"])["id"].to_pylist()


# ----------------------------------------------------------------------------- config and CLI
@pytest.mark.parametrize("name", ["caption-demo.yaml", "caption-llava-1.5-7b.yaml"])
def test_example_configs_validate_and_print_config_loads_back(name, tmp_path, capsys):
    from pipelines.caption import main

    cfg = load_config(CONFIGS / name, CaptionJobConfig)
    if name == "caption-demo.yaml":
        assert cfg == CaptionJobConfig()  # the demo job is the default job
    printed = tmp_path / "full.yaml"
    assert main(["--config", str(CONFIGS / name), "--print-config"]) == 0
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed, CaptionJobConfig) == cfg
    assert main(["--config", str(CONFIGS / name), "--print-config", "--mode", "ar", "--prompt", "what?"]) == 0
    printed.write_text(capsys.readouterr().out)
    flags = load_config(printed, CaptionJobConfig)  # the flags are applied to what is printed
    assert (flags.engine.mode, flags.decode.prompt) == ("ar", "what?") and flags.model == cfg.model


def test_llava_config_validates():
    cfg = load_config(CONFIGS / "caption-llava-1.5-7b.yaml", CaptionJobConfig)
    assert cfg.gpus_per_actor == 1 and cfg.model.target.startswith("s3://") and cfg.model.dtype == "float16"
    assert (cfg.engine.tree.top_k, cfg.engine.tree.total_tokens, cfg.engine.tree.depth) == (10, 60, 7)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"actors": {"min": 3, "max": 2}}, "actors"),
        ({"batch_size": 0}, "batch_size"),
        ({"bogus": 1}, "bogus"),
        ({"engine": {"mode": "fast"}}, "engine.mode"),
        ({"input": "http://example.com/images"}, "input"),
        ({"decode": {"video_frames": 9}}, "decode"),
        ({"decode": {"limits": {"max_pixels": 0}}}, "decode.limits.max_pixels"),
    ],
)
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError, match=rf"(?m)^  {re.escape(field)}(\.| *:)"):
        parse_config(data, CaptionJobConfig, source="job.yaml")


def test_a_decode_key_at_the_top_level_says_where_it_moved():
    with pytest.raises(ConfigError, match=r"prompt, limits: now under decode: \(decode\.prompt"):
        parse_config({"prompt": "what is it?", "limits": {"max_pixels": 10}}, CaptionJobConfig, source="job.yaml")


def test_cli_flags_override_the_config(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    job_yaml = {"batch_size": 2, "decode": {"prompt": "what is it?"}, "engine": {"mode": "ar"}}
    cfg_file.write_text(yaml.safe_dump(job_yaml))
    argv = ["--config", str(cfg_file), "--input", "s3://b/in", "--output", str(tmp_path / "o"), "--actors", "1:3",
            "--max-new-tokens", "5", "--mode", "eagle", "--gpus-per-actor", "0.5"]  # fmt: skip
    cfg = parse_args(argv)
    assert (cfg.input, cfg.actors.min, cfg.actors.max, cfg.sampling.max_new_tokens) == ("s3://b/in", 1, 3, 5)
    assert (cfg.engine.mode, cfg.gpus_per_actor, cfg.batch_size, cfg.decode.prompt) == ("eagle", 0.5, 2, "what is it?")
    assert parse_args(["--actors", "2"]).actors.max == 2
    assert parse_args(["--draft", "s3://b/drafts/v3"]).model.draft == "s3://b/drafts/v3"
    with pytest.raises(ConfigError, match="batch_size"):
        parse_args(["--batch-size", "0"])


def test_main_reports_bad_arguments(tmp_path):
    from pipelines.caption import main

    with pytest.raises(SystemExit, match="actors"):
        main(["--actors", "3:1", "--input", "x", "--output", "y"])
    with pytest.raises(SystemExit, match="--input and --output"):
        main([])


def test_actor_module_does_not_import_torch():
    """The engine's heavy imports happen inside the actor, not where the job is planned."""
    code = "import sys, actors.captioner; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- CPU stages, called directly
def test_corpus_rows_decode_or_fail_with_their_kind(tmp_path):
    expected = corpus(tmp_path / "in")
    inputs = cio.list_inputs(str(tmp_path / "in"))
    assert inputs.ignored == CORPUS_IGNORED and [s["id"] for s in inputs.shards] == ["no-media.tar", "shard.tar"]
    shard_rows = cio.expand_shards(cio.listed_table(inputs.shards), 10**6)
    listed = pa.concat_tables([cio.listed_table(inputs.files), *shard_rows])
    rows = {r["id"]: r for r in cio.decode_rows(listed, OPTS).to_pylist()}
    assert sorted(rows) == sorted(expected)
    for rid, kind in expected.items():
        r = rows[rid]
        if kind is None:
            assert r["error"] is None, (rid, r["error"])
            assert len(r["pixels"]) == r["width"] * r["height"] * 3 and r["width"] >= 1
        else:
            assert r["error"].split(":")[0] == kind and r["pixels"] is None, (rid, r["error"])
    assert rows["clip.mp4"]["prompt"] == "describe the video."
    assert rows["odd/cmyk.jpg"]["prompt"] == "describe the image."
    latin1 = rows["odd/caf%E9-latin1.png"]  # a name that is not UTF-8: id and uri percent-encoded, reversibly
    assert latin1["uri"].startswith("file://") and latin1["uri"].endswith("/odd/caf%E9-latin1.png")
    assert os.path.isfile(os.fsdecode(unquote_to_bytes(latin1["uri"][len("file://") :])))
    assert unquote_to_bytes(latin1["id"]) == b"odd/caf\xe9-latin1.png"
    assert rows["shard.tar/%FF"]["error"] is None and rows["odd/_DSC0001.JPG"]["error"] is None
    assert rows["odd/thin.mp4"]["width"] * 8 == rows["odd/thin.mp4"]["height"]  # 2x2 tiles of 1x16 frames
    assert rows["bad/float64.tiff"]["error"].startswith("unsupported: TIFF pixel layout 1 x 64-bit float")
    assert (
        rows["no-media.tar"]["error"].startswith("empty: tar shard")
        and "2 other members" in rows["no-media.tar"]["error"]
    )


def test_listing_counts_what_it_ignores_and_skips_only_the_jobs_output(tmp_path):
    src = tmp_path / "in"
    (src / "sub" / ".git").mkdir(parents=True)
    (src / "sub" / ".git" / "x.png").write_bytes(b"")  # inside a hidden folder: not listed, the folder counts once
    (src / "_DSC0001.JPG").write_bytes(b"")
    (src / "sub" / "loop").symlink_to(src)  # a cycle: listed once
    out = src / "out"
    out.mkdir()
    for name in ("run-1_a_000000-0.parquet", "_summary.json", "_partial-run-0.parquet"):
        (out / name).write_bytes(b"")
    inputs = cio.list_inputs(str(src), skip=str(out))
    assert [r["id"] for r in inputs.files] == ["_DSC0001.JPG"]
    assert inputs.ignored == {"hidden": 1, "symlink_loop": 1}
    assert cio.list_inputs(str(src)).ignored == {"hidden": 1, "symlink_loop": 1, "not_media": 3}
    assert [r["id"] for r in cio.list_inputs(str(src / "_DSC0001.JPG")).files] == ["_DSC0001.JPG"]


def test_any_exception_while_decoding_one_input_is_that_rows_error(monkeypatch):
    real = cio.decode_one

    def flaky(data, name, opts):
        if name == "b.png":
            raise ValueError("tile_frames: cells of 0 pixels")  # what a 1-pixel-wide video used to raise
        return real(data, name, opts)

    monkeypatch.setattr(cio, "decode_one", flaky)
    png = save(Image.new("RGB", (8, 8)), "PNG")
    rows = cio.decode_rows(cio.listed_table([{"id": n, "uri": n, "data": png} for n in ("a.png", "b.png")]), OPTS)
    assert rows["error"].to_pylist() == [None, "decode: ValueError: tile_frames: cells of 0 pixels"]


def test_video_tiles_keep_the_frame_aspect_and_max_aspect_ratio_applies_per_frame():
    video = encode_video([Image.new("RGB", (96, 16), (20 * i, 0, 0)) for i in range(6)])
    assert cio.decode_one(video, "wide.mp4", OPTS).size == (96, 16)  # 2x2 tiles of 48x8: the frames' 6:1 kept
    with pytest.raises(MediaError, match="aspect ratio 96x4 > max_aspect_ratio=20"):  # 4 tiles in a row: 24:1
        cio.decode_one(video, "wide.mp4", cio.DecodeOptions(video_tile_cols=4))
    strict = CaptionJobConfig(decode={"max_aspect_ratio": 4}).decode  # the shorthand flows into limits
    assert strict.limits.max_aspect_ratio == 4
    row = cio.decode_rows(cio.listed_table([{"id": "w", "uri": "wide.mp4", "data": video}]), strict).to_pylist()[0]
    assert row["error"] == "too_large: aspect ratio 96x16 > max_aspect_ratio=4"
    with pytest.raises(ConfigError, match="differ"):
        parse_config({"decode": {"max_aspect_ratio": 4, "limits": {"max_aspect_ratio": 5}}}, CaptionJobConfig)


def test_video_frames_are_tiled_like_the_demo_recipe():
    from specvlm.demo.recipe import to_example

    frames, _ = shapes_video()
    image = cio.decode_one(encode_video(frames), "clip.mp4", OPTS)
    reference = to_example({"frames": frames, "prompt": "", "response": ""}, 4)["image"]
    assert image.size == reference.size == (IMAGE_SIZE, IMAGE_SIZE)
    diff = sum(abs(a - b) for a, b in zip(image.tobytes(), reference.tobytes())) / len(image.tobytes())
    assert diff < 8  # the same four frames, tiled 2x2; H.264 is lossy


def test_large_images_are_downscaled_and_prompts_take_precedence():
    opts = cio.DecodeOptions(max_side=100, prompt="what is it?")
    row = cio.listed_table([{"id": "a", "uri": "a.png", "data": save(Image.new("RGB", (400, 200)), "PNG")},
                            {"id": "b", "uri": "b.png", "data": b"", "prompt": "own prompt"}])  # fmt: skip
    a, b = cio.decode_rows(row, opts).to_pylist()
    assert (a["width"], a["height"], a["prompt"]) == (100, 50, "what is it?")
    assert (b["error"], b["prompt"]) == ("empty: zero bytes", "own prompt")


def test_tar_shards_expand_and_a_broken_shard_keeps_its_samples(tmp_path):
    im, _ = shapes(1)[0]
    png = save(im, "PNG")
    members = {f"{i:03d}.png": png for i in range(6)} | {"000.json": b"{}", "big.png": b"x" * 200_000}
    write_shard(tmp_path / "ok.tar", members)
    write_shard(tmp_path / "cut.tar", {f"{i:03d}.png": save(shapes(1, seed=i)[0][0], "BMP") for i in range(4)},
                truncate=True)  # fmt: skip
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    shards = cio.listed_table([{"id": n, "uri": str(tmp_path / n)} for n in ("ok.tar", "cut.tar", "junk.tar")])
    rows = pa.concat_tables(list(cio.expand_shards(shards, max_bytes=100_000, chunk_rows=4))).to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert [f"ok.tar/{i:03d}" for i in range(6)] == [r["id"] for r in rows[:6]]
    assert by_id["ok.tar/000"]["data"] == png and by_id["ok.tar/000"]["uri"].endswith("ok.tar#000.png")
    assert by_id["ok.tar/big"]["error"].startswith("too_large: 200000 bytes")
    cut = [r for r in rows if r["id"].startswith("cut.tar")]
    assert cut[-1]["id"] == "cut.tar" and cut[-1]["error"].startswith("decode: tar shard") and len(cut) >= 2
    assert by_id["junk.tar"]["error"].startswith("decode: tar shard")
    assert len(by_id) == len(rows)  # ids are unique


def test_manifest_rows_resolve_relative_uris():
    batch = pa.table({"id": [1, None, 3], "uri": ["a.png", "s3://b/k.png", None], "prompt": ["q?", None, ""]})
    rows = cio.normalize_manifest(batch, "s3://bucket/dir").to_pylist()
    assert [(r["id"], r["uri"], r["prompt"]) for r in rows] == [
        ("1", "s3://bucket/dir/a.png", "q?"), ("s3://b/k.png", "s3://b/k.png", None), ("3", "", None)]  # fmt: skip
    assert rows[2]["error"] == "manifest: a manifest row has no uri"
    assert cio.drop_done(cio.normalize_manifest(batch, "/m"), pa.array(["1"])).num_rows == 2


def test_jsonl_manifest_one_bad_line_is_one_error_row_and_ids_become_strings(tmp_path):
    lines = [b'{"id": 1, "uri": "a.png"}', b'{"id": "two", "uri": "b.png", "prompt": "q?"}', b"",
             b'{"id": 3, "uri": ', b"[1, 2]", b"\xff\xfe not utf-8", b'{"id": true, "uri": "s3://b/c.png"}',
             b'{"uri": "/abs/d.png"}', b'{"id": 2.5, "uri": "e.png"}\r', b'{"id": "x"}']  # fmt: skip
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines))
    rows = pa.concat_tables(cio.expand_manifest(cio.listed_table([{"id": "m", "uri": str(tmp_path / "m.jsonl")}]),
                                                chunk_rows=3)).to_pylist()  # fmt: skip
    by_id = {r["id"]: r for r in rows}
    assert [r["id"] for r in rows] == ["1", "two", "m.jsonl#L4", "m.jsonl#L5", "m.jsonl#L6", "true", "/abs/d.png",
                                       "2.5", "x"]  # fmt: skip
    assert by_id["1"]["uri"] == f"{tmp_path}/a.png" and by_id["two"]["prompt"] == "q?"
    assert by_id["m.jsonl#L4"]["error"].startswith("manifest: m.jsonl line 4 is not a JSON object with a uri")
    assert "not an object" in by_id["m.jsonl#L5"]["error"] and "utf-8" in by_id["m.jsonl#L6"]["error"]
    assert by_id["x"]["error"] == "manifest: m.jsonl line 10 has no uri"
    assert [by_id[i]["error"] for i in ("1", "two", "true", "/abs/d.png", "2.5")] == [None] * 5


def test_manifest_given_by_bare_name_resolves_against_its_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.jsonl").write_text('{"id": "a", "uri": "a.png"}\n')
    monkeypatch.chdir(tmp_path / "data")
    inputs = cio.list_inputs("m.jsonl")
    assert inputs.manifest == str(tmp_path / "data" / "m.jsonl")  # absolute on the driver
    assert storage.manifest_base("m.jsonl") == str(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # a worker's working directory does not matter
    [row] = next(cio.expand_manifest(cio.listed_table([{"id": "m", "uri": inputs.manifest}]))).to_pylist()
    assert row["uri"] == str(tmp_path / "data" / "a.png")


def test_resource_warning_when_the_pool_and_a_decode_task_do_not_fit():
    cfg = CaptionJobConfig(actors={"min": 1, "max": 2}, cpus_per_actor=1, cpus_per_decode_task=1)
    assert cio is not None and resource_warning(cfg, 0, [{"Alive": True, "Resources": {"CPU": 2}}]) is None
    assert "no node has CPU=1 left for a decode task" in resource_warning(cfg, 0, [{"Resources": {"CPU": 1}}])
    assert "can hold 0 of actors.min=1" in resource_warning(cfg, 1, [{"Resources": {"CPU": 4}}])  # no GPU
    pinned = cfg.model_copy(update={"actor_resources": {"gpu_node": 1}})
    nodes = [{"Resources": {"CPU": 1, "gpu_node": 1}}, {"Alive": False, "Resources": {"CPU": 8}}]
    assert "no node has CPU=1 left" in resource_warning(pinned, 0, nodes)


def test_s3_reads_fail_their_row_when_missing_or_forbidden(moto_s3, monkeypatch):
    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    s3, b = moto_s3.client(), moto_s3.bucket
    s3.put_object(Bucket=b, Key="unit/ok.png", Body=save(Image.new("RGB", (4, 4)), "PNG"))
    s3.put_object(Bucket=b, Key="forbidden/secret.png", Body=b"x")
    assert storage.read_bytes(f"s3://{b}/unit/ok.png", 1000).startswith(b"\x89PNG")
    keys = ("unit/ok.png", "unit/missing.png", "forbidden/secret.png")
    rows = cio.decode_rows(cio.listed_table([{"id": k, "uri": f"s3://{b}/{k}"} for k in keys]), OPTS).to_pylist()
    assert rows[0]["error"] is None and rows[0]["width"] == 4
    assert rows[1]["error"] == f"read: not found: s3://{b}/unit/missing.png"
    assert rows[2]["error"] == f"read: access denied: s3://{b}/forbidden/secret.png"


def test_output_scan_moves_partial_files_and_dedupe_keeps_the_first(tmp_path):
    from actors.captioner import OUTPUT_SCHEMA

    def part(name, ids):
        cols = {c: [None] * len(ids) for c in OUTPUT_SCHEMA.names} | {"id": ids, "caption": [name] * len(ids)}
        pq.write_table(pa.Table.from_pydict(cols, schema=OUTPUT_SCHEMA), tmp_path / name)

    part("run-1_a_000000-0.parquet", ["a", "b"])
    part("run-2_b_000000-0.parquet", ["b", "c", "c"])
    good = (tmp_path / "run-1_a_000000-0.parquet").read_bytes()
    (tmp_path / "run-3_c_000000-0.parquet").write_bytes(good[: len(good) // 2])  # a crash mid-write
    state = cio.scan_output(str(tmp_path))
    assert sorted(state.done.to_pylist()) == ["a", "b", "c"] and state.files == 2
    assert [Path(p).name for p in state.partial] == ["_partial-run-3_c_000000-0.parquet"]
    assert cio.dedupe_output(str(tmp_path)) == 2
    table = cio.read_output(str(tmp_path))
    first, second = "run-1_a_000000-0.parquet", "run-2_b_000000-0.parquet"
    assert sorted(zip(table["id"].to_pylist(), table["caption"].to_pylist())) == [
        ("a", first),
        ("b", first),
        ("c", second),
    ]


# ----------------------------------------------------------------------------- the Captioner, called directly
def test_captioner_matches_the_engine_and_passes_errors_through(small_demo, demo_paths):
    from actors.captioner import OUTPUT_SCHEMA, Captioner
    from specvlm import SpecVLMEngine
    from specvlm.inputs import encode

    demo, _ = small_demo
    images = [im for im, _ in shapes(3, seed=3)]
    listed = [{"id": f"i{k}", "uri": f"i{k}.png", "data": save(im, "PNG")} for k, im in enumerate(images)]
    listed.insert(1, {"id": "bad", "uri": "bad.png", "data": b"nope"})
    batch = cio.decode_rows(cio.listed_table(listed), OPTS)
    cap = Captioner(ModelConfig(**demo_paths), EngineConfig(mode="ar"), SamplingConfig(max_new_tokens=10),
                    batching="static", max_rows=4)  # fmt: skip
    out = cap(batch)
    assert out.schema == OUTPUT_SCHEMA and out["id"].to_pylist() == ["i0", "bad", "i1", "i2"]
    rows = out.to_pylist()
    assert rows[1]["caption"] is None and rows[1]["error"].startswith("decode:")
    assert rows[1]["model"] == demo_paths["target"]
    proc = demo.processor
    enc = encode(proc, ["describe the image."] * 3, images)
    ref = SpecVLMEngine(demo.target, None, EngineConfig(mode="ar")).generate(**enc, max_new_tokens=10)
    ok = [r for r in rows if r["error"] is None]
    captions = [proc.tokenizer.decode(s, skip_special_tokens=True).strip() for s in ref.sequences]
    assert [r["caption"] for r in ok] == captions
    assert all(r["num_tokens"] == len(s) and r["accept_length"] == 1.0 for r, s in zip(ok, ref.sequences))
    assert all(r["compressor"] == "none" and r["latency_ms"] > 0 and r["draft_version"] is None for r in ok)


# ----------------------------------------------------------------------------- jobs on the session's Ray cluster
def test_job_captions_every_input_once_and_resumes(ray_local, demo_paths, tmp_path):
    expected = corpus(tmp_path / "in")
    out = tmp_path / "out"
    summary = run(job(demo_paths, tmp_path / "in", out))
    table = cio.read_output(str(out))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(table["id"].to_pylist()) == sorted(expected)  # each id exactly once
    for rid, kind in expected.items():
        r = rows[rid]
        if kind is None:
            assert r["error"] is None and r["caption"] and r["num_tokens"] >= 1 and r["accept_length"] >= 1, rid
            assert r["compressor"] == "none" and r["latency_ms"] > 0 and r["draft_version"] == demo_paths["draft"]
        else:
            assert r["error"].split(":")[0] == kind and r["caption"] is None, rid
    assert rows["clip.mp4"]["prompt"] == "describe the video."
    n_bad = sum(k is not None for k in expected.values())
    assert summary["rows"] == len(expected) and summary["ok"] == len(expected) - n_bad
    assert sum(summary["errors"].values()) == n_bad and summary["compressors"] == {"none": len(expected) - n_bad}
    assert summary["tokens_per_s"] > 0 and summary["mean_accept_length"] >= 1
    assert summary["ignored"] == CORPUS_IGNORED  # entries that are no input are counted, by reason
    assert json.loads((out / "_summary.json").read_text())["run_id"] == summary["run_id"]

    # rerun: nothing to do
    again = run(job(demo_paths, tmp_path / "in", out))
    assert again["rows"] == 0 and again["existing_ids"] == len(expected) and again["total_rows"] == len(expected)

    # a manifest into the same output: ids already written are skipped, the rest captioned once, with their prompts
    for i, (im, _) in enumerate(shapes(2, seed=9)):
        (tmp_path / f"new-{i}.png").write_bytes(save(im, "PNG"))
    manifest = [{"id": "shapes/0.png", "uri": "in/shapes/0.png"},  # already written
                {"id": "q0", "uri": "new-0.png", "prompt": "how many shapes are there?"},
                {"id": "q1", "uri": str(tmp_path / "new-1.png")},
                {"id": "gone", "uri": "in/missing.png"}, {"id": "q0", "uri": "new-0.png"}]  # fmt: skip
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in manifest))
    third = run(job(demo_paths, path, out, decode={"prompt": "what color is the circle?"}))
    assert third["errors"] == {"read": 1} and third["duplicates_removed"] == 1  # q0 twice in the manifest
    assert sorted(ids_of(out)) == sorted([*expected, "q0", "q1", "gone"])  # each id once
    rows = {r["id"]: r for r in cio.read_output(str(out)).to_pylist()}
    assert rows["q1"]["prompt"] == "what color is the circle?" and rows["q1"]["caption"] is not None
    assert rows["q0"]["prompt"] in ("how many shapes are there?", "what color is the circle?")
    assert rows["gone"]["error"] == f"read: not found: {tmp_path / 'in' / 'missing.png'}"


def test_model_batches_are_full_whatever_the_input_blocks(ray_local, tmp_path, monkeypatch):
    """40 files in 5-row blocks (as 4001-5000 files are), decode batches of 16, model batches of 8: 5 model calls
    of 8 rows (bundles of 4 blocks used to be cut into 8 + 8 + 4 rows: 6 calls here, 30 instead of 25 per 200)."""
    from actors.captioner import OUTPUT_SCHEMA
    from pipelines import caption

    class CountingCaptioner:  # defined here so that Ray pickles it by value
        def __init__(self, model, engine, sampling, batching, max_rows):
            self.tag, self.calls = uuid.uuid4().hex[:8], itertools.count()

        def __call__(self, batch: pa.Table) -> pa.Table:  # two at once per actor: next() is atomic, += is not
            call = next(self.calls)
            n = batch.num_rows
            cols = {c: [None] * n for c in OUTPUT_SCHEMA.names}
            cols |= {"id": batch["id"].to_pylist(), "caption": [f"{self.tag}-{call}"] * n}
            return pa.Table.from_pydict(cols, schema=OUTPUT_SCHEMA)

    png = save(Image.new("RGB", (8, 8)), "PNG")
    for i in range(40):
        (tmp_path / f"{i:02d}.png").write_bytes(png)
    monkeypatch.setattr(caption, "MAX_INPUT_BLOCKS", 8)  # 40 files -> 8 blocks of 5 rows
    cfg = CaptionJobConfig(input=str(tmp_path), output=str(tmp_path / "out"), batch_size=8, decode_batch_size=16)
    inputs = cio.list_inputs(cfg.input)
    ds = caption.build_dataset(cfg, inputs, pa.array([], pa.string()), captioner=CountingCaptioner)
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == [f"{i:02d}.png" for i in range(40)]
    calls = Counter(r["caption"] for r in rows)
    assert sorted(calls.values()) == [8] * 5, calls


@pytest.mark.parametrize("batching, calls", [("continuous", 2), ("static", 1)])
def test_a_continuous_actor_runs_two_calls_at_once(ray_local, tmp_path, batching, calls):
    """Ray Data runs `CaptionJobConfig.calls_per_actor` calls at once in one actor (in two threads: so a
    batch's rows can join the engine while the previous batch's decode); static runs one at a time."""
    from actors.captioner import OUTPUT_SCHEMA
    from pipelines import caption

    class ProbeCaptioner:  # defined here so that Ray pickles it by value
        def __init__(self, model, engine, sampling, batching, max_rows):
            self.lock, self.now, self.most, self.pid = threading.Lock(), 0, 0, os.getpid()

        def __call__(self, batch: pa.Table) -> pa.Table:
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(0.5)
            with self.lock:
                self.now -= 1
                seen = f"{self.pid}:{self.most}"
            cols = {c: [None] * batch.num_rows for c in OUTPUT_SCHEMA.names}
            cols |= {"id": batch["id"].to_pylist(), "caption": [seen] * batch.num_rows}
            return pa.Table.from_pydict(cols, schema=OUTPUT_SCHEMA)

    png = save(Image.new("RGB", (8, 8)), "PNG")
    for i in range(12):
        (tmp_path / f"{i:02d}.png").write_bytes(png)
    cfg = CaptionJobConfig(input=str(tmp_path), output=str(tmp_path / "out"), batch_size=2, batching=batching)
    assert cfg.calls_per_actor() == calls
    ds = caption.build_dataset(cfg, cio.list_inputs(cfg.input), pa.array([], pa.string()), captioner=ProbeCaptioner)
    seen = [r["caption"] for r in ds.take_all()]
    assert len({s.split(":")[0] for s in seen}) == 1  # one actor
    assert max(int(s.split(":")[1]) for s in seen) == calls


def _captioner_pids(dashboard: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return [a.pid for a in actors if "Captioner" in (a.class_name or "")]


def test_killed_actor_is_restarted_and_its_batch_retried(ray_local, ray_head, demo_paths, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, (im, _) in enumerate(shapes(24, seed=6)):
        (src / f"{i:02d}.png").write_bytes(save(im, "PNG"))
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_when_busy():
        deadline = time.monotonic() + 120
        pids: list[int] = []
        while not pids and time.monotonic() < deadline:  # the actor is up (loading its engine)
            pids = _captioner_pids(ray_head.dashboard_url)
            time.sleep(0.1)
        while pids and not list(out.glob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.01)
        if pids and time.monotonic() < deadline:  # mid-job: the first part file is written, most rows are not
            os.kill(pids[0], signal.SIGKILL)
            killed.append(len(list(out.glob("*.parquet"))))

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    summary = run(job(demo_paths, src, out, batch_size=2, rows_per_file=2, max_task_retries=3,
                      sampling={"max_new_tokens": 24}))  # fmt: skip
    killer.join()
    assert killed and killed[0] < 12, "the captioner actor was not killed mid-job (12 part files of 2 rows in all)"
    assert sorted(ids_of(out)) == sorted(f"{i:02d}.png" for i in range(24))  # every id once
    assert summary["errors"] == {} and summary["duplicates_removed"] == 0
