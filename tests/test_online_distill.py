"""Online distillation in a caption job (`pipelines.online_distill`): the buffer never holds the actors up,
training rows are the batches the offline path builds, and end to end the job publishes and promotes
versions, swaps them into its actor, stays token-identical to ``ar``, and survives its trainer being killed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from caption_inputs import save, shapes

from actors.row_buffer import BufferFeeder, RowBuffer
from pipelines import caption_io as cio
from pipelines.caption import CaptionJobConfig, parse_args, run
from specvlm.config import ConfigError, parse_config


def test_buffer_holds_out_the_first_rows_drops_the_oldest_and_ends_on_close():
    buf = RowBuffer(capacity=3, held_out_rows=2)
    buf.put([{"i": i} for i in range(4)])
    assert buf.held_out() == [{"i": 0}, {"i": 1}]  # never handed out for training
    buf.put([{"i": i} for i in range(4, 7)], dropped_before=5)
    rows, closed = buf.take(2, timeout_s=0.1)
    assert rows == [{"i": 4}, {"i": 5}] and not closed  # 2 and 3 were the oldest when the buffer overflowed
    t0 = time.monotonic()
    rows, closed = buf.take(5, timeout_s=0.2)  # fewer than asked: waits up to the timeout, returns what is there
    assert rows == [{"i": 6}] and not closed and time.monotonic() - t0 >= 0.15
    threading.Timer(0.1, buf.close).start()
    rows, closed = buf.take(5, timeout_s=30)  # close wakes a waiting take
    assert rows == [] and closed
    assert buf.stats() == {"received": 7, "dropped_full": 2, "dropped_at_actors": 5, "to_trainer": 3, "held_out": 2,
                           "buffered": 0, "trainer": {}}  # fmt: skip


def test_feeder_stops_sending_once_the_buffer_is_retired(ray_local):
    import ray

    buf = ray.remote(num_cpus=0, max_concurrency=4)(RowBuffer).remote(8, 1)
    feeder = BufferFeeder(buf)
    assert feeder.offer([{"i": 0}, {"i": 1}])
    deadline = time.monotonic() + 30
    while ray.get(buf.stats.remote())["received"] < 2 and time.monotonic() < deadline:  # (a threaded actor's calls
        time.sleep(0.05)  # run in any order)
    ray.get(buf.retire.remote())  # the trainer stopped for good: the buffered rows go, no more are taken
    assert feeder.offer([{"i": 2}])  # sent: the feeder learns from this put's answer
    deadline = time.monotonic() + 30
    while not feeder.retired and time.monotonic() < deadline:
        feeder.offer([{"i": 3}])
        time.sleep(0.05)
    assert feeder.retired and not feeder.offer([{"i": 4}]) and feeder.dropped_total == 0
    stats = ray.get(buf.stats.remote())
    assert stats["received"] == 2 and stats["held_out"] == 1 and stats["buffered"] == 0
    ray.kill(buf)


def test_patience_stops_once_the_trend_flattens():
    from pipelines.online_distill import Patience

    p = Patience(2, 0.02)
    # the starting draft, gains, then the last two (4.12, 4.0: mean 4.06) are not 2% above the two before
    # (4.1, 4.05: mean 4.075): converged at the sixth measurement
    assert [p.update(a) for a in (2.6, 3.3, 4.1, 4.05, 4.12, 4.0)] == [False] * 5 + [True]
    assert p.means == pytest.approx((4.075, 4.06))
    # a benchmark run's figures: one lucky 4.253 then three below it no longer stop a draft still improving
    noisy = Patience(3, 0.02)
    assert not any(noisy.update(a) for a in (2.674, 2.736, 3.299, 4.253, 4.057, 4.011, 4.253))
    one = Patience(1, 0.02)  # patience 1: the first version without a 2% gain over the one before
    assert [one.update(a) for a in (3.0, 3.5, 3.52)] == [False, False, True]
    never = Patience(None, 0.02)
    assert not any(never.update(2.6) for _ in range(10))


def test_feeder_never_waits_for_a_buffer_that_lags(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    class Stuck:  # a buffer that takes 30 s per put (a trainer side that cannot keep up)
        def put(self, rows, dropped_before=0):
            time.sleep(30)

    stuck = Stuck.remote()
    feeder = BufferFeeder(stuck, max_in_flight=2)
    t0 = time.monotonic()
    went = [feeder.offer([{"i": i}] * 4) for i in range(10)]
    assert time.monotonic() - t0 < 5  # each offer returned at once
    assert went == [True, True] + [False] * 8 and feeder.dropped_total == 32
    ray.kill(stuck)


def test_training_batch_from_decoded_rows_is_the_offline_batch(small_demo):
    """The trainer's batch from what an actor holds (encoded prompt + the target's tokens) equals the offline
    job's `collate` of the same samples with the same responses."""
    import torch

    from specvlm.demo.recipe import examples
    from specvlm.distill import batch_from_inputs, collate, encode_samples
    from specvlm.inputs import pad_token_id

    demo, _ = small_demo
    samples = examples(seed=3, n=3, p_video=0.3, p_qa=0.3)
    responses = [[5, 6, 7], [8], [9, 10, 11, 12]]
    pad = pad_token_id(demo.processor.tokenizer)
    online = batch_from_inputs([encode_samples(demo.processor, [s]) for s in samples], responses, pad)
    offline = collate(demo.processor, samples, responses)
    for name in ("input_ids", "attention_mask", "loss_mask", "pixel_values"):
        assert torch.equal(getattr(online, name), getattr(offline, name)), name


def test_online_distill_flag_and_config():
    assert parse_args(["--input", "in", "--output", "out", "--online-distill"]).online_distill.enabled
    assert not parse_args(["--input", "in", "--output", "out"]).online_distill.enabled
    with pytest.raises(ConfigError, match="online_distill needs a draft"):
        parse_args(["--input", "in", "--output", "out", "--online-distill", "--mode", "ar"])


@pytest.mark.slow
def test_job_publishes_promotes_swaps_and_survives_its_trainer_killed(ray_local, ray_head, small_demo, tmp_path):
    """One job: versions are published and promoted while it runs, its actor swaps them in (rows name them),
    every caption equals an ``ar`` run's; then the trainer's worker is killed and the job still ends with
    every row, its summary saying training stopped and why. (A tiny learning rate keeps every version's
    held-out accept length equal to the starting draft's, so each one is promoted: this tests the loop's
    mechanics; the benchmark measures what training gains.)"""
    from ray.util.state import list_actors

    demo, _ = small_demo
    src, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ar"
    src.mkdir()
    n = 160
    for i, (im, _) in enumerate(shapes(n, seed=5)):
        (src / f"{i:03d}.png").write_bytes(save(im, "PNG"))
    model = {"target": str(demo.path / "target"), "draft": str(demo.path / "draft")}
    base = {"input": str(src), "batch_size": 4, "rows_per_file": 8, "decode_batch_size": 8, "cpus_per_actor": 0.5,
            "cpus_per_decode_task": 0.5, "sampling": {"max_new_tokens": 48}, "model": model}  # fmt: skip
    online = {"enabled": True, "batch_size": 1, "publish_every": 1, "held_out_rows": 1, "lr": 1e-12,
              "eval_max_new_tokens": 8, "poll_s": 0.2, "stop_timeout_s": 60, "wait_for_trainer_s": 180,
              "idle_priority": False, "patience": None}  # fmt: skip
    store = out / "_drafts"
    killed: list[int] = []

    def kill_the_trainer_after_two_promotions():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            try:
                history = json.loads((store / "promoted.json").read_text())["history"]
            except (OSError, ValueError):
                history = []
            if len(history) >= 2:
                alive = [("state", "=", "ALIVE"), ("class_name", "=", "RayTrainWorker")]
                workers = list_actors(address=ray_head.dashboard_url, raise_on_missing_output=False, filters=alive)
                for w in workers:
                    os.kill(w.pid, signal.SIGKILL)
                    killed.append(w.pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_trainer_after_two_promotions, daemon=True)
    killer.start()
    summary = run(parse_config({**base, "output": str(out), "online_distill": online}, CaptionJobConfig))
    killer.join(5)

    rows = {r["id"]: r for r in cio.read_output(str(out)).to_pylist()}
    assert sorted(rows) == [f"{i:03d}.png" for i in range(n)] and summary["errors"] == {}
    section = summary["online_distill"]
    promoted = [v["version"] for v in section["versions"] if v["promoted"]]
    assert len(promoted) >= 2, section
    assert sum(v["rows_decoded"] for v in section["versions"]) + section["start_draft"]["rows_decoded"] == n
    assert killed, "the trainer was not killed mid-job"
    assert section["status"] == "stopped" and "trainer failed" in section["reason"], section
    assert section["rows"]["held_out"] == 1 and section["rows"]["to_trainer"] >= 2

    # resume on the same output with new inputs: the actor follows the store from its first batch, so every new
    # row decodes with the promoted version (which rows of the first job did depends on timing)
    more = tmp_path / "more"
    more.mkdir()
    for i, (im, _) in enumerate(shapes(24, seed=6)):
        (more / f"m{i}.png").write_bytes(save(im, "PNG"))
    (src / "m0.png").write_bytes((more / "m0.png").read_bytes())
    # (patience 1: the first version without a gain, at its first step, ends training as converged)
    resumed = run(parse_config({**base, "input": str(more), "output": str(out),
                                "online_distill": {**online, "patience": 1}}, CaptionJobConfig))  # fmt: skip
    assert resumed["rows"] == 24 and resumed["errors"] == {}
    again = resumed["online_distill"]
    assert again["status"] == "finished" and again["reason"].startswith("converged") and again["steps"] == 1, again
    new_rows = [r for r in cio.read_output(str(out)).to_pylist() if r["id"].startswith("m")]
    assert all(r["draft_version"] in promoted for r in new_rows), "rows did not decode with a promoted version"
    rows.update({r["id"]: r for r in new_rows})

    ar = run(parse_config({**base, "output": str(ref), "engine": {"mode": "ar"}}, CaptionJobConfig))
    assert ar["errors"] == {}
    for r in cio.read_output(str(ref)).to_pylist():
        assert rows[r["id"]]["caption"] == r["caption"], r["id"]  # token-identical whatever draft decoded it
