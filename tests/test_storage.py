"""`specvlm.storage`: bounded reads of local files and S3 objects, the S3 model mirror, manifests, job_env."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specvlm import storage
from specvlm.media import MediaError


def test_read_bytes_is_bounded_and_names_what_failed(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    assert storage.read_bytes(str(tmp_path / "a.bin"), 10) == b"x" * 10
    with pytest.raises(MediaError, match="too_large: 10 bytes > max_bytes=9"):
        storage.read_bytes(str(tmp_path / "a.bin"), 9)
    with pytest.raises(storage.ReadError, match="not found: "):
        storage.read_bytes(str(tmp_path / "missing.bin"), 10)
    with pytest.raises(storage.ReadError, match="not a file: "):
        storage.read_bytes(str(tmp_path), 10)
    with pytest.raises(storage.ReadError, match="unsupported URI scheme"):
        storage.read_bytes("http://example.com/a.png", 10)


def test_manifest_suffixes_are_one_list(tmp_path):
    assert storage.MANIFEST_SUFFIXES == (".parquet", ".jsonl")
    assert storage.is_manifest("s3://b/rows.JSONL") and storage.is_manifest("rows.parquet")
    assert not storage.is_manifest("rows.json") and not storage.is_manifest("rows.csv")
    with pytest.raises(ValueError, match=r"'rows.csv' is not a manifest; expected a file ending in .parquet, .jsonl"):
        storage.check_manifest("rows.csv")
    pq.write_table(pa.table({"id": ["1"], "uri": ["a.png"]}), tmp_path / "m.parquet")
    assert storage.manifest_columns(str(tmp_path / "m.parquet")) == ["id", "uri"]
    assert storage.manifest_base(str(tmp_path / "m.parquet")) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.manifest_columns(str(tmp_path / "none.parquet"))


def test_job_env_forwards_s3_and_cache_settings_not_set_by_a_submission(monkeypatch):
    for k in storage.FORWARDED_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SPECVLM_HOME", "/cache")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("UNRELATED", "x")
    assert storage.job_env() == {"SPECVLM_HOME": "/cache", "AWS_REGION": "eu-west-1"}
    submitted = {"runtime_env": {"working_dir": ".", "env_vars": {"AWS_REGION": "eu-west-1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(submitted))  # under `ray job submit`
    assert storage.job_env() == {"SPECVLM_HOME": "/cache"}


def test_s3_reads_and_the_model_mirror(moto_s3, tmp_path, monkeypatch):
    """Against the moto server (endpoint from AWS_ENDPOINT_URL): bounded reads, a forbidden key, and an
    s3:// draft folder mirrored once into $SPECVLM_HOME/s3 and loaded from there."""
    from specvlm import EagleDraft
    from specvlm.loading import load_draft
    from specvlm.tiny import tiny_llava

    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SPECVLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    s3, b = moto_s3.client(), moto_s3.bucket
    s3.put_object(Bucket=b, Key="store/blob", Body=b"y" * 100)
    s3.put_object(Bucket=b, Key="forbidden/blob", Body=b"z")
    assert storage.read_bytes(f"s3://{b}/store/blob", 100) == b"y" * 100
    with pytest.raises(MediaError, match="too_large"):
        storage.read_bytes(f"s3://{b}/store/blob", 99)
    with pytest.raises(storage.ReadError, match=f"not found: s3://{b}/store/none"):
        storage.read_bytes(f"s3://{b}/store/none", 100)
    with pytest.raises(storage.ReadError, match=f"access denied: s3://{b}/forbidden/blob"):
        storage.read_bytes(f"s3://{b}/forbidden/blob", 100)

    draft = EagleDraft.from_target(tiny_llava(), seed=2)
    draft.save_pretrained(tmp_path / "draft")
    for f in (tmp_path / "draft").iterdir():
        s3.put_object(Bucket=b, Key=f"models/draft/{f.name}", Body=f.read_bytes())
    loaded = load_draft(f"s3://{b}/models/draft")
    assert all(a.equal(c) for a, c in zip(draft.state_dict().values(), loaded.state_dict().values()))
    mirrored = tmp_path / "home" / "s3" / b / "models" / "draft"
    assert sorted(p.name for p in mirrored.iterdir()) == [".complete", "config.json", "model.safetensors"]
    with pytest.raises(FileNotFoundError, match=f"no objects under s3://{b}/models/none"):
        load_draft(f"s3://{b}/models/none")
