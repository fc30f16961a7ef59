"""Shared fixtures: tiny random-init VLMs built in code, a draft distilled onto one, the session's Ray
cluster and a moto S3 server (both on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def greedy_reference(model, inputs: dict, max_new_tokens: int) -> list[list[int]]:
    """The target's own HF generate (greedy, image tokens suppressed), cut after EOS."""
    from specvlm.tiny import EOS, IMAGE

    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=[IMAGE])
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    return [r[: r.index(EOS) + 1] if EOS in r else r for r in new]


@pytest.fixture(scope="session")
def trained_qwen_pair():
    """A float32 tiny Qwen2.5-VL, a draft distilled on its greedy outputs over image, video and text-only
    prompts, and the distillation's per-step losses."""
    from specvlm import EagleDraft, EngineConfig, SpecVLMEngine
    from specvlm.distill import DistillBatch, distill_step, make_optimizer
    from specvlm.inputs import CONCAT_KEYS, left_pad
    from specvlm.target import TargetAdapter
    from specvlm.tiny import PAD, tiny_qwen, tiny_qwen_inputs

    model = tiny_qwen("qwen2_5_vl", seed=1)
    for p in model.parameters():
        p.requires_grad_(False)
    ar = SpecVLMEngine(model, None, EngineConfig(mode="ar"))
    media = [("image", 16, 16), ("image", 8, 24), ("video", 4, 16, 16), None]
    batches = []
    for s in range(8):
        rows = [(media[(s + i) % 4], 3 + (s + i) % 5) for i in range(8)]
        inp = tiny_qwen_inputs(model, rows, seed=100 + s)
        seqs = ar.generate(**inp, max_new_tokens=24).sequences
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inp["input_ids"], inp["attention_mask"])]
        rest = {k: inp[k] for k in CONCAT_KEYS if k in inp and k != "pixel_values"}
        batches.append(DistillBatch.from_padded(left_pad(prompts, PAD, seqs), inp.get("pixel_values"), rest))
    draft = EagleDraft.from_target(model, seed=0)
    target = TargetAdapter(model)
    opt = make_optimizer(draft, lr=3e-3)
    losses = [distill_step(target, draft, batches[step % len(batches)], opt).loss.item() for step in range(300)]
    draft.eval()
    return model, draft, losses


@pytest.fixture(scope="session")
def trained_pair():
    """A float32 tiny LLaVA and a draft distilled for a few hundred steps on its greedy outputs.

    The draft agrees with the target often, so multi-token acceptance and the
    KV-cache commit of long paths are exercised (accept length well above 1).
    """
    from specvlm import EagleDraft, EngineConfig, SpecVLMEngine
    from specvlm.distill import DistillBatch, distill_step, make_optimizer
    from specvlm.inputs import left_pad
    from specvlm.target import TargetAdapter
    from specvlm.tiny import PAD, tiny_inputs, tiny_llava

    model = tiny_llava(layers=2, seed=1)
    for p in model.parameters():
        p.requires_grad_(False)
    ar = SpecVLMEngine(model, None, EngineConfig(mode="ar"))
    batches = []
    for s in range(8):
        inp = tiny_inputs(model, [3 + s % 5] * 8, seed=100 + s)
        seqs = ar.generate(**inp, max_new_tokens=24).sequences
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inp["input_ids"], inp["attention_mask"])]
        batches.append(DistillBatch.from_padded(left_pad(prompts, PAD, seqs), inp["pixel_values"]))
    draft = EagleDraft.from_target(model, seed=0)
    target = TargetAdapter(model)
    opt = make_optimizer(draft, lr=3e-3)
    for step in range(300):
        distill_step(target, draft, batches[step % len(batches)], opt)
    draft.eval()
    return model, draft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    """The session's Ray cluster: ``ray start --head --block`` in a subprocess, on loopback."""

    address: str  # GCS address for ray.init
    dashboard_url: str  # for `ray job submit --address` and the state API
    env: dict  # the environment the cluster's processes run with (PATH starts at this venv)
    log: Path


@pytest.fixture(scope="session")
def ray_head():
    """One Ray cluster for the whole test run (starting Ray costs ~10 s here), loopback only.

    Started as ``ray start --head --block`` so that ``ray job submit`` tests can use its
    dashboard; every port is picked free, the temp dir is private, and the teardown stops
    only the processes this fixture started (SIGTERM to ``ray start --block``, which stops
    its children; never ``ray stop``, which would stop other users' clusters too).
    """
    pytest.importorskip("ray")
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port, dash = free_port(), free_port()
    flags = {name: free_port() for name in ("ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")}  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # a test cluster has nothing to drain on SIGTERM
    log = tmp / "head.log"
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--num-cpus=2", "--num-gpus=0", f"--temp-dir={tmp}", "--disable-usage-stats",
           *(f"--{k}={v}" for k, v in flags.items())]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env, log)
    try:
        deadline = time.monotonic() + 90
        while True:  # the dashboard answers once the head is fully up
            try:
                urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start failed; its log:\n{log.read_text()[-4000:]}") from None
                time.sleep(0.5)
        yield head
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this fixture started
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(ray_head):
    """This test process connected (``ray.init``) to the session's Ray cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.address, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@dataclass
class MotoS3:
    """A moto S3 server on loopback with IAM enforced: ``env`` holds an IAM user's credentials that may do
    anything in S3 except ``GetObject`` of keys with a ``forbidden/`` folder in them."""

    endpoint: str
    env: dict  # AWS_* variables for that user (endpoint included)
    bucket: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])  # fmt: skip


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """``moto_server -H 127.0.0.1 -p PORT`` for the session; IAM auth switched on after the setup requests."""
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        root = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="root",
                    aws_secret_access_key="root")  # fmt: skip
        iam = boto3.client("iam", **root)
        iam.create_user(UserName="captioner")
        key = iam.create_access_key(UserName="captioner")["AccessKey"]
        bucket = "specvlm-test"
        deny = {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*forbidden/*"}
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}, deny]}
        iam.put_user_policy(UserName="captioner", PolicyName="s3", PolicyDocument=json.dumps(policy))
        boto3.client("s3", **root).create_bucket(Bucket=bucket)
        req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})  # fmt: skip
        urllib.request.urlopen(req, timeout=5).read()  # from now on every request is signed and checked
        env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}  # fmt: skip
        yield MotoS3(endpoint, env, bucket)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """The demo recipe at reduced size and step count (same code path as ``make demo-model``)."""
    from specvlm.demo import load_demo
    from specvlm.demo.recipe import DemoRecipe, build_demo

    out = tmp_path_factory.mktemp("specvlm-home") / "demo"
    metrics = build_demo(out, DemoRecipe().small(), progress=False)
    return load_demo(out), metrics
