"""The installed ``specvlm`` console script as a user runs it: exit statuses, ``make demo`` the way the README
says, and how a job reaches Ray (never a stale cluster named in Ray's temp folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from caption_inputs import save, shapes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout)


def test_console_script_exit_status(ray_head, small_demo, tmp_path):
    """0 once the job completed, error rows included; 3 with --fail-on-errors; 1 with a message on bad flags."""
    demo, _ = small_demo
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "ok.png").write_bytes(save(shapes(1)[0][0], "PNG"))
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.address}
    model = ["--config", str(tmp_path / "job.yaml"), "--input", str(inputs)]
    (tmp_path / "job.yaml").write_text(
        f"model: {{target: {demo.path / 'target'}, draft: {demo.path / 'draft'}}}\nsampling: {{max_new_tokens: 6}}\n"
    )
    done = run([str(BIN / "specvlm"), "caption", *model, "--output", str(tmp_path / "out")], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "{'run_id'" not in done.stderr  # the summary is printed as lines, not dumped by sys.exit
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert rows["ok.png"]["error"] is None and rows["broken.png"]["error"].startswith("decode:")

    strict = run([str(BIN / "specvlm"), "caption", *model, "--output", str(tmp_path / "out2"), "--fail-on-errors"], env)
    assert strict.returncode == 3, strict.stdout[-3000:] + strict.stderr[-3000:]
    assert "1 rows have errors" in strict.stdout

    bad = run([str(BIN / "specvlm"), "caption", "--input", str(inputs)], env, timeout=60)
    assert bad.returncode == 1 and "--input and --output are required" in bad.stderr


def test_print_config_exits_before_ray(tmp_path):
    """``specvlm caption|serve --print-config`` print the full config (a file and flags applied) and exit 0."""
    import yaml

    from actors.serve_config import load_serve_file
    from pipelines.caption import CaptionJobConfig
    from specvlm.config import load_config

    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}  # never reached
    job = ROOT / "configs" / "caption-llava-1.5-7b.yaml"
    cap = run([str(BIN / "specvlm"), "caption", "--config", str(job), "--batch-size", "3", "--print-config"], env)
    assert cap.returncode == 0, cap.stderr[-3000:]
    (tmp_path / "job.yaml").write_text(cap.stdout)
    assert load_config(tmp_path / "job.yaml", CaptionJobConfig) == load_config(job, CaptionJobConfig).model_copy(
        update={"batch_size": 3}
    )
    srv = run([str(BIN / "specvlm"), "serve", "--port", "8123", "--print-config"], env)
    assert srv.returncode == 0, srv.stderr[-3000:]
    (tmp_path / "serve.yaml").write_text(srv.stdout)
    assert yaml.safe_load(srv.stdout)["http_options"]["port"] == load_serve_file(tmp_path / "serve.yaml").port == 8123


def test_make_demo_as_the_readme_says(tmp_path):
    """``make demo`` on an empty $SPECVLM_HOME (the shipped demo model) with a stale Ray cluster file around:
    the job starts its own Ray instead of joining the dead address, captions the examples and exits 0."""
    venv = BIN.parent
    if not (venv / ".installed").is_file():
        pytest.skip(f"{venv} was not made by `make` (no .installed stamp)")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # what an old `ray start` leaves
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MAKEFLAGS", "MFLAGS")}
        env |= {"SPECVLM_HOME": str(tmp_path / "home"), "RAY_TMPDIR": str(ray_tmp)}
        out = tmp_path / "caption-demo"
        done = run(["make", "demo", f"VENV={venv}", f"DEMO_OUT={out}"], env, timeout=600)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-4000:]
        assert "Error" not in log and "Failed to connect" not in log
        rows = pq.read_table(out).to_pylist()
        examples = [p for p in (ROOT / "examples" / "inputs").iterdir() if p.suffix != ".tar"]
        assert len(rows) >= len(examples) and all(r["error"] is None for r in rows)
        assert not (tmp_path / "home" / "demo").exists()  # the shipped build was used, nothing was trained
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_init_ray_joins_only_what_it_is_told(ray_head):
    """``--address`` / $RAY_ADDRESS join that cluster; a process already connected keeps its connection."""
    code = (
        "import ray; from pipelines.ray_cluster import init_ray; "
        "started = init_ray(); print(started, ray.get_runtime_context().gcs_address); "
        "print(init_ray('127.0.0.1:9')); ray.shutdown()"
    )
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.address}
    done = run([sys.executable, "-c", code], env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = done.stdout.split("\n")[:2]
    port = ray_head.address.rsplit(":", 1)[1]
    assert first.startswith("False ") and first.endswith(f":{port}") and second == "False"  # the session's cluster


def test_specvlm_serve_on_a_shared_cluster_removes_only_its_own_application(ray_local, ray_head, small_demo, tmp_path):
    """``specvlm serve --address`` deploys its application on the running cluster and, on SIGTERM, deletes just
    that application: Serve's controller and the cluster stay up for everyone else."""
    import signal
    import time

    import yaml
    from conftest import free_port
    from ray import serve

    demo, _ = small_demo
    app = {"model": {"target": str(demo.path / "target"), "draft": str(demo.path / "draft")}, "auth": "none",
           "deployment": {"ray_actor_options": {"num_cpus": 0}}}  # fmt: skip
    config = tmp_path / "serve.yaml"
    spec = {"name": "cli-app", "route_prefix": "/cli", "import_path": "actors.serving:build_app", "args": app}
    http = {"host": "127.0.0.1", "port": free_port()}
    config.write_text(yaml.safe_dump({"http_options": http, "applications": [spec]}))
    env = {k: v for k, v in ray_head.env.items() if k not in ("RAY_ADDRESS", "SPECVLM_API_KEY")}
    log = tmp_path / "serve.log"

    def app_status() -> str | None:
        apps = serve.status().applications
        return apps["cli-app"].status if "cli-app" in apps else None

    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "specvlm"), "serve", "--config", str(config), "--address", ray_head.address],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while app_status() != "RUNNING":
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"specvlm serve did not deploy; its log:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()[-4000:]
        assert "cli-app" not in serve.status().applications  # its own application is gone; Serve's proxy is not
        with urllib.request.urlopen(f"http://127.0.0.1:{http['port']}/-/healthz", timeout=10) as r:
            assert r.status == 200
        assert ray_local.is_initialized() and ray_local.cluster_resources().get("CPU")
    finally:
        if proc.poll() is None:
            proc.kill()
        serve.shutdown()  # as the other Serve tests do: the next one starts Serve with its own port
