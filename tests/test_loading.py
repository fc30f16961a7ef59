"""Naming and loading models: `resolve_model` (demo, local folders, missing ones, modes), `load_engine` on its
result, and `EagleDraft.check_fits` as the one answer to "does this draft fit this target"."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from specvlm import EagleDraft, EngineConfig, SpecVLMEngine
from specvlm.config import ModelConfig
from specvlm.loading import SHIPPED_DEMO_DIR, DemoNotBuiltError, load_engine, resolve_model
from specvlm.tiny import tiny_llava


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny target folder (model + demo processor) and a draft folder for it."""
    from specvlm.demo import build_processor

    root = tmp_path_factory.mktemp("models")
    model = tiny_llava(vocab=64, image_size=64, patch=8, hidden=64, layers=2)
    model.save_pretrained(root / "target")
    build_processor(image_size=64, patch_size=8).save_pretrained(root / "target")
    EagleDraft.from_target(model, seed=0).save_pretrained(root / "draft")
    return root


@pytest.mark.parametrize("mode, draft", [("ar", None), ("eagle", "draft"), ("specvlm", "draft-specvlm")])
def test_demo_is_the_shipped_build_with_the_draft_of_the_mode(mode, draft, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECVLM_HOME", str(tmp_path))  # an empty cache
    f = resolve_model(ModelConfig(target="demo"), mode)
    assert (f.target, f.demo, f.target_name, f.dtype) == (str(SHIPPED_DEMO_DIR / "target"), SHIPPED_DEMO_DIR,
                                                           "specvlm-demo", "float32")  # fmt: skip
    assert f.draft == (str(SHIPPED_DEMO_DIR / draft) if draft else None)
    assert f.draft_name == (f"specvlm-demo-{draft}@{SHIPPED_DEMO_DIR}" if draft else None)


def test_demo_rebuild_in_the_cache_wins_and_an_incomplete_one_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECVLM_HOME", str(tmp_path))
    for part in ("target", "draft", "draft-specvlm"):
        (tmp_path / "demo" / part).mkdir(parents=True)
        (tmp_path / "demo" / part / "config.json").write_text("{}")
    assert resolve_model(ModelConfig(), "eagle").draft == str(tmp_path / "demo" / "draft")
    with pytest.raises(DemoNotBuiltError, match=rf"no demo model in {tmp_path / 'elsewhere'}: run `make demo-model`"):
        resolve_model(ModelConfig(), "eagle", demo_root=tmp_path / "elsewhere")


def test_local_folders_and_modes(folders):
    target, draft = str(folders / "target"), str(folders / "draft")
    f = resolve_model(ModelConfig(target=target, draft=draft), "eagle")
    assert (f.target, f.draft, f.demo, f.target_name, f.draft_name, f.dtype) == (target, draft, None, target, draft,
                                                                                  None)  # fmt: skip
    assert resolve_model(ModelConfig(target=target, draft=draft), "ar").draft is None  # ar needs no draft
    assert resolve_model(ModelConfig(target=target), "ar").draft is None
    with pytest.raises(ValueError, match="mode 'eagle' needs a draft: set model.draft"):
        resolve_model(ModelConfig(target=target), "eagle")
    assert resolve_model(ModelConfig(target=target), "specvlm", fresh_draft=True).draft is None  # distill: fresh
    assert resolve_model(ModelConfig(target="s3://bucket/llava"), "ar").target == "s3://bucket/llava"  # not fetched


def test_missing_or_invalid_folders_are_named(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.target /no/such/model does not exist \(use a local HF"):
        resolve_model(ModelConfig(target="/no/such/model"), "ar")
    with pytest.raises(FileNotFoundError, match=rf"model.target {tmp_path} is not a model folder: it has no config"):
        resolve_model(ModelConfig(target=str(tmp_path)), "ar")
    with pytest.raises(FileNotFoundError, match="model.draft /no/draft does not exist"):
        resolve_model(ModelConfig(target=str(folders / "target"), draft="/no/draft"), "eagle")
    with pytest.raises(ValueError, match="not 'demo'"):
        resolve_model(ModelConfig(draft="demo"), "eagle")
    with pytest.raises(ValueError, match="http://x/model"):
        resolve_model(ModelConfig(target="http://x/model"), "ar")


def test_load_engine_names_what_it_loaded(folders):
    engine, processor, info = load_engine(ModelConfig(target=str(folders / "target"), draft=str(folders / "draft")))
    assert info == {"model": str(folders / "target"), "draft_version": str(folders / "draft")}
    assert engine.draft is not None and processor.tokenizer.padding_side == "left"
    _, _, info = load_engine(ModelConfig(target=str(folders / "target")), EngineConfig(mode="ar"))
    assert info["draft_version"] is None


def test_a_draft_for_another_target_is_refused_in_one_place():
    """`EagleDraft.check_fits`: the engine and `EagleDraft.for_target` (the distill job) give the same error."""
    target = tiny_llava(hidden=64)
    other = EagleDraft.from_target(tiny_llava(hidden=32, layers=1))
    EagleDraft.from_target(target).check_fits(target)
    message = "draft hidden size 32 != target's 64: the draft was trained for another target"
    with pytest.raises(ValueError, match=message):
        other.check_fits(target)
    with pytest.raises(ValueError, match=message):
        SpecVLMEngine(target, other, EngineConfig(mode="eagle"))
    with pytest.raises(ValueError, match=message):
        EagleDraft.for_target(target, other)


def test_loading_does_not_import_the_demo():
    """The import runs one way: `specvlm.demo` uses `specvlm.loading`, never the reverse."""
    tree = ast.parse((Path(__file__).resolve().parent.parent / "specvlm" / "loading.py").read_text())
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            base = ("specvlm." if n.level else "") + (n.module or "")
            names |= {base} | {f"{base}.{a.name}".replace("..", ".") for a in n.names}
        elif isinstance(n, ast.Import):
            names |= {a.name for a in n.names}
    assert not any(m == "specvlm.demo" or m.startswith("specvlm.demo.") for m in names), names
