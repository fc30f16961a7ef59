"""The caption job end to end through its command line: S3 in and out (moto), a driver killed mid-job and
restarted, and ``ray job submit`` against the session's ``ray start --head`` cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from caption_inputs import encode_video, noise, save, shapes, shapes_video

from pipelines import caption_io as cio
from specvlm import storage

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "inputs"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job_yaml(small_demo, tmp_path_factory) -> Path:
    """A job config naming the small demo's folders, sized for tests."""
    demo, _ = small_demo
    path = tmp_path_factory.mktemp("caption-e2e") / "job.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"target": str(demo.path / "target"), "draft": str(demo.path / "draft")},
        "sampling": {"max_new_tokens": 12}, "batch_size": 4, "rows_per_file": 2, "decode_batch_size": 4,
    }))  # fmt: skip
    return path


def cli(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.caption", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_s3_in_and_out_with_forbidden_and_bad_objects(ray_head, moto_s3, job_yaml, monkeypatch):
    s3, b = moto_s3.client(), moto_s3.bucket
    frames, _ = shapes_video()
    objects = {f"e2e/in/{i}.png": save(im, "PNG") for i, (im, _) in enumerate(shapes(3, seed=11))}
    jpg = save(noise(), "JPEG")
    objects |= {"e2e/in/clip.mp4": encode_video(frames), "e2e/in/bad/truncated.jpg": jpg[: len(jpg) // 2],
                "e2e/in/forbidden/secret.png": save(shapes(1)[0][0], "PNG")}  # fmt: skip
    for key, data in objects.items():
        s3.put_object(Bucket=b, Key=key, Body=data)
    env = {**ray_head.env, **moto_s3.env, "RAY_ADDRESS": ray_head.address}
    args = ["--config", str(job_yaml), "--input", f"s3://{b}/e2e/in", "--output", f"s3://{b}/e2e/out"]
    log = finish(cli(args, env))
    assert "[caption] 6 rows (4 captioned, errors: decode 1, read 1)" in log, log[-3000:]

    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    rows = {r["id"]: r for r in cio.read_output(f"s3://{b}/e2e/out").to_pylist()}
    assert sorted(rows) == sorted(k[len("e2e/in/") :] for k in objects)
    assert rows["forbidden/secret.png"]["error"] == f"read: access denied: s3://{b}/e2e/in/forbidden/secret.png"
    assert rows["bad/truncated.jpg"]["error"].startswith("decode: JPEG")
    assert rows["clip.mp4"]["caption"] and rows["clip.mp4"]["uri"] == f"s3://{b}/e2e/in/clip.mp4"
    summary = json.loads(s3.get_object(Bucket=b, Key="e2e/out/_summary.json")["Body"].read())
    assert summary["rows"] == 6 and summary["errors"] == {"decode": 1, "read": 1}

    log = finish(cli(args, env))  # resume: everything is written already
    assert "[caption] 0 rows" in log and "6 ids were already written" in log, log[-3000:]
    assert cio.read_output(f"s3://{b}/e2e/out", columns=["id"]).num_rows == 6


def _a_part_reads(out: Path) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in out.glob("[!_]*.parquet"):
        try:
            pq.read_table(path, columns=["id"])
            return True
        except (pa.ArrowException, OSError):  # still being written
            pass
    return False


def test_killed_driver_then_rerun_finishes_the_rest(ray_head, ray_local, job_yaml, tmp_path):
    from pipelines.caption import CaptionJobConfig, run
    from specvlm.config import load_config

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    n = 30
    for i, (im, _) in enumerate(shapes(n, seed=12)):
        (src / f"{i:02d}.png").write_bytes(save(im, "PNG"))
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.address}
    proc = cli(["--config", str(job_yaml), "--input", str(src), "--output", str(out), "--batch-size", "2"], env,
               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    # Kill once a part file is complete (a file that merely exists may be half-written, and is then redone).
    while not _a_part_reads(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver (its own process group), mid-job
    proc.communicate()
    written = cio.scan_output(str(out))
    assert 0 < len(written.done) < n, "the job was not killed mid-way"

    cfg = load_config(job_yaml, CaptionJobConfig).model_copy(update={"input": str(src), "output": str(out)})
    summary = run(cfg)
    assert summary["existing_ids"] == len(written.done) and summary["rows"] == n - len(written.done)
    ids = cio.read_output(str(out), columns=["id"])["id"].to_pylist()
    assert sorted(ids) == sorted(f"{i:02d}.png" for i in range(n))  # each id exactly once


def test_ray_job_submit(ray_head, job_yaml, tmp_path):
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.dashboard_url,
           "--working-dir", str(ROOT), "--", "python", "-m", "pipelines.caption", "--config", str(job_yaml),
           "--input", str(EXAMPLES), "--output", str(out)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "[caption] 8 rows (8 captioned, errors: none)" in res.stdout, res.stdout[-3000:]
    ids = cio.read_output(str(out), columns=["id"])["id"].to_pylist()
    expected = json.loads((ROOT / "examples" / "expected.json").read_text())
    assert sorted(ids) == sorted(k for k in expected if "." in k)  # the files and shard samples, not manifest ids
