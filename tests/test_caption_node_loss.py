"""The caption job survives losing the node that holds its model actor: two worker nodes join the session's
Ray cluster (loopback), each offering the custom resource the job's actor asks for; the raylet of the node
holding the actor is SIGKILLed mid-job. Ray restarts the actor on the other node and retries its batches, so
every id appears exactly once and no row is an error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from caption_inputs import save, shapes
from conftest import free_port

from pipelines import caption_io as cio
from pipelines.caption import CaptionJobConfig, run
from specvlm.config import parse_config

pytestmark = pytest.mark.slow

RESOURCE = "caption_node_loss"  # only the worker nodes started here have it


def start_worker(head_address: str, env: dict, log: Path, k: int) -> subprocess.Popen:
    """``ray start --block`` joining the session cluster as a 1-CPU node with RESOURCE. Its ports and worker
    port range are its own, so that it does not collide with the head or the other worker on this host."""
    flags = {name: free_port() for name in ("object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")}  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", f"--address={head_address}",
           "--node-ip-address=127.0.0.1", f"--node-manager-port={free_port()}", "--num-cpus=1", "--num-gpus=0",
           f'--resources={{"{RESOURCE}": 1}}', "--object-store-memory=100000000", "--disable-usage-stats",
           f"--min-worker-port={30000 + 100 * k}", f"--max-worker-port={30099 + 100 * k}",
           *(f"--{k}={v}" for k, v in flags.items())]  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def join_worker(ray, head, log: Path, k: int, attempts: int = 3) -> subprocess.Popen:
    """Start worker ``k`` and wait until it is an alive node of the cluster. ``ray start`` gives its raylet a
    fixed 30 s to register with the GCS and exits when that passes; on a loaded 2-core host (an earlier test's
    job still shutting down) it can, so a start that exits is retried with fresh ports, up to ``attempts``."""
    logs = []
    for attempt in range(attempts):
        proc = start_worker(head.address, head.env, log, k)
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            if sum(1 for nd in ray.nodes() if nd["Alive"] and RESOURCE in nd["Resources"]) > k:
                return proc
            time.sleep(0.5)
        logs.append(f"attempt {attempt + 1}: exit {proc.poll()}\n{log.read_text()[-2000:]}")
        stop(proc)
    raise AssertionError(f"worker {k} did not join the cluster:\n" + "\n".join(logs))


def stop(proc: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` this test started, and the processes of its group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def descendants(proc: subprocess.Popen) -> dict[int, str]:
    """The processes below ``proc`` (read from /proc): pid -> argv[0], e.g. ``.../raylet`` or an actor's
    process title ``ray::MapWorker(MapBatches(Captioner)).submit``."""
    parent, argv0 = {}, {}
    for d in (d for d in Path("/proc").iterdir() if d.name.isdigit()):
        try:
            rest = (d / "stat").read_text().rsplit(")", 1)[1]
            argv0[int(d.name)] = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError):
            continue
        parent[int(d.name)] = int(rest.split()[1])

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == proc.pid:
                return True
        return False

    return {pid: a for pid, a in argv0.items() if below(pid)}


def test_lost_node_costs_time_not_the_job(ray_local, ray_head, small_demo, tmp_path):
    import ray

    demo, _ = small_demo
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    n = 16
    for i, (im, _) in enumerate(shapes(n, seed=21)):
        (src / f"{i:02d}.png").write_bytes(save(im, "PNG"))
    workers = []
    try:
        for k in range(2):  # one after the other: two raylets starting at once on one host race for socket names
            workers.append(join_worker(ray, ray_head, tmp_path / f"worker-{k}.log", k))
        killed: list[tuple[int, float]] = []  # (part files written when the node was lost, time)

        def kill_the_actors_node():
            # The actor's node is found from /proc (the Captioner's process is below one worker's ``ray start``),
            # not through the state API: on a loaded 2-core host a state API call can hang past the whole job.
            deadline, first_seen = time.monotonic() + 120, None
            while time.monotonic() < deadline:
                trees = [descendants(proc) for proc in workers]
                holding = [k for k, tree in enumerate(trees) if any("Captioner" in a for a in tree.values())]
                first_seen = first_seen or (time.monotonic() if holding else None)
                # mid-job: a first part file is written, or the actor has been up for 0.5 s with batches queued
                # for it (on a fast machine the whole job takes a few seconds and its part files may arrive in
                # one burst at the end, so waiting for a file can miss the job)
                if holding and (list(out.glob("*.parquet")) or time.monotonic() - first_seen > 0.5):
                    [raylet] = [pid for pid, a in trees[holding[0]].items() if a.endswith("/raylet")]
                    os.kill(raylet, signal.SIGKILL)  # the node is gone, its actor and objects with it
                    killed.append((len(list(out.glob("*.parquet"))), time.monotonic()))
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_the_actors_node, daemon=True)
        killer.start()
        cfg = parse_config({"input": str(src), "output": str(out), "batch_size": 2, "rows_per_file": 2,
                            "decode_batch_size": 2, "actor_resources": {RESOURCE: 1}, "cpus_per_actor": 1,
                            "sampling": {"max_new_tokens": 48},
                            "model": {"target": str(demo.path / "target"), "draft": str(demo.path / "draft")}},
                           CaptionJobConfig)  # fmt: skip
        t0 = time.monotonic()
        summary = run(cfg)
        killer.join(5)
        assert killed and killed[0][0] < n // 2, "the actor's node was not lost mid-job"
        ids = cio.read_output(str(out), columns=["id"])["id"].to_pylist()
        assert sorted(ids) == [f"{i:02d}.png" for i in range(n)]  # every id exactly once
        assert summary["errors"] == {} and summary["duplicates_removed"] == 0
        print(f"node lost after {killed[0][1] - t0:.1f} s; job done in {time.monotonic() - t0:.1f} s")
    finally:
        for proc in workers:
            stop(proc)
