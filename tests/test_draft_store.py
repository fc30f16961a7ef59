"""`specvlm.draft_store`: versions appear whole, promotion never goes to a worse draft, local and S3 alike."""

from __future__ import annotations

import pytest
import torch

from specvlm import EagleDraft, storage
from specvlm.draft_store import DraftStore
from specvlm.tiny import tiny_llava


@pytest.fixture(scope="module")
def drafts():
    model = tiny_llava()
    return [EagleDraft.from_target(model, seed=s) for s in range(3)]


def _same(a: EagleDraft, b: EagleDraft) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _exercise(store: DraftStore, drafts) -> None:
    assert store.versions() == [] and store.promoted() is None and store.history() == []
    v1 = store.publish(drafts[0], step=10, accept_length=2.5, held_out_rows=16)
    v2 = store.publish(drafts[1], step=20, accept_length=2.4, held_out_rows=16)
    assert [v.name for v in store.versions()] == ["v000001", "v000002"] and v2.step == 20
    assert store.promote(v1) and store.promoted() == v1
    assert not store.promote(v2)  # held-out accept length below the promoted one's
    assert not store.promote(v1)  # already promoted
    v3 = store.publish(drafts[2], step=30, accept_length=2.5)
    assert store.promote(v3) and store.promoted() == v3  # as good counts
    assert [h["version"] for h in store.history()] == [1, 3] and all("promoted_at" in h for h in store.history())
    assert _same(store.load(v3), drafts[2]) and _same(store.load(v1), drafts[0])


def test_local_store_publishes_promotes_and_loads(drafts, tmp_path):
    store = DraftStore(str(tmp_path / "drafts"))
    _exercise(store, drafts)
    (tmp_path / "drafts" / "v000004").mkdir()  # a version being written: no version.json yet
    assert [v.version for v in store.versions()] == [1, 2, 3]
    assert store.publish(drafts[0], step=40, accept_length=None).version == 4
    assert not store.promote(store.versions()[-1])  # not measured: never replaces a promoted draft


def test_s3_store_publishes_promotes_and_loads(drafts, moto_s3, tmp_path, monkeypatch):
    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SPECVLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    _exercise(DraftStore(f"s3://{moto_s3.bucket}/job/_drafts"), drafts)
    assert list((tmp_path / "home" / "drafts").glob("*/v000003/version.json"))  # mirrored once, loaded locally


def test_first_promotion_must_reach_the_starting_drafts_accept_length(drafts, tmp_path):
    store = DraftStore(str(tmp_path / "drafts"))
    v1 = store.publish(drafts[0], step=5, accept_length=2.0)
    assert not store.promote(v1, floor=2.1) and store.promoted() is None  # worse than what the job started with
    v2 = store.publish(drafts[1], step=10, accept_length=2.1)
    assert store.promote(v2, floor=2.1) and store.promoted() == v2


def test_follower_hands_over_each_newly_promoted_version_once(drafts, tmp_path, monkeypatch):
    from specvlm import draft_store

    clock = [100.0]
    monkeypatch.setattr(draft_store.time, "monotonic", lambda: clock[0])
    store = DraftStore(str(tmp_path / "drafts"))
    follower = draft_store.DraftFollower(str(tmp_path / "drafts"), poll_s=5.0, current="start")
    assert follower.poll() is None  # nothing promoted
    store.promote(store.publish(drafts[1], step=10, accept_length=2.0))
    assert follower.poll() is None  # looked 0 s ago: not before poll_s
    clock[0] += 5.0
    draft, name = follower.poll()
    assert name == "v000001" and _same(draft, drafts[1]) and follower.current == "v000001"
    clock[0] += 5.0
    assert follower.poll() is None  # already held
    (tmp_path / "drafts" / "promoted.json").write_text("{not json")  # a store in a bad state: keep the draft
    clock[0] += 5.0
    assert follower.poll() is None and follower.current == "v000001"


def test_a_floor_replaces_the_promoted_versions_own_figure(drafts, tmp_path):
    """A resumed trainer measures on new held-out rows: the promoted version's stored figure (other rows) does
    not count, the floor measured on the same rows does."""
    store = DraftStore(str(tmp_path / "drafts"))
    assert store.promote(store.publish(drafts[0], step=5, accept_length=3.0))
    v2 = store.publish(drafts[1], step=10, accept_length=2.8)
    assert not store.promote(v2, floor=2.9)
    assert store.promote(v2, floor=2.7) and store.promoted() == v2
    assert not store.promote(v2, floor=2.0)  # already promoted
