"""A versioned store of distilled drafts: what a trainer publishes and what running engines follow.

Layout under a root (a local folder or an ``s3://`` prefix, through `specvlm.storage`)::

    <root>/v000001/          an `EagleDraft` folder (`save_pretrained`) + version.json (step, held-out accept length)
    <root>/v000002/
    <root>/promoted.json     the version engines decode with, and every promotion so far

A version becomes visible whole: its draft files are written first and its
``version.json`` last, and a folder without one is not a version. ``promoted.json``
is replaced in one write (a local file is written aside and renamed; an S3 PUT
is atomic), so a reader sees the old promotion or the new one.

The promotion rule (`DraftStore.promote`): a version replaces the promoted one
only when its held-out accept length is at least the promoted one's, so a job
that follows the store never decodes with a worse draft than it had. Drafts
never change outputs, only speed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs

from .storage import filesystem, mirror

log = logging.getLogger(__name__)

VERSION_FILE = "version.json"
PROMOTED_FILE = "promoted.json"


@dataclass(frozen=True)
class DraftVersion:
    """One published draft."""

    version: int  # 1, 2, ... in publishing order
    step: int  # the trainer's optimizer step it was taken at
    accept_length: float | None  # on held-out rows the trainer did not train on (None: not measured)
    held_out_rows: int  # rows that accept length was measured on
    published_at: float  # unix time

    @property
    def name(self) -> str:
        """The version's folder name and how output rows name it (``draft_version``)."""
        return f"v{self.version:06d}"


class DraftStore:
    """Publish, list, promote and load draft versions under ``root`` (local folder or ``s3://`` prefix)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.path = filesystem(self.root)

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def _read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def _write_json(self, path: str, data: dict) -> None:
        body = json.dumps(data, indent=2).encode()
        if isinstance(self.fs, pafs.LocalFileSystem):  # write aside, then rename over: readers see old or new
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).with_name(f".{Path(path).name}.tmp")
            tmp.write_bytes(body)
            tmp.replace(path)
            return
        with self.fs.open_output_stream(path) as f:  # one PUT
            f.write(body)

    # ------------------------------------------------------------------ read
    def versions(self) -> list[DraftVersion]:
        """Every published version, oldest first."""
        try:
            entries = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = posixpath.basename(e.path)
            if e.type == pafs.FileType.Directory and name.startswith("v") and name[1:].isdigit():
                meta = self._read_json(self._join(name, VERSION_FILE))
                if meta is not None:
                    out.append(DraftVersion(**meta))
        return sorted(out, key=lambda v: v.version)

    def promoted(self) -> DraftVersion | None:
        """The version engines should decode with (None: nothing promoted yet)."""
        meta = self._read_json(self._join(PROMOTED_FILE))
        return None if meta is None else DraftVersion(**meta["current"])

    def history(self) -> list[dict]:
        """Every promotion: the version's fields and ``promoted_at``."""
        meta = self._read_json(self._join(PROMOTED_FILE))
        return [] if meta is None else meta["history"]

    def load(self, version: DraftVersion):
        """The version's `EagleDraft` (an ``s3://`` store is mirrored once into the local model cache)."""
        from .draft import EagleDraft
        from .loading import specvlm_home

        folder = self._join(version.name)
        if isinstance(self.fs, pafs.LocalFileSystem):
            return EagleDraft.from_pretrained(folder)
        key = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        local = specvlm_home() / "drafts" / key / version.name
        if not (local / VERSION_FILE).is_file():
            mirror(f"{self.root}/{version.name}", local)
        return EagleDraft.from_pretrained(local)

    # ----------------------------------------------------------------- write
    def publish(self, draft, step: int, accept_length: float | None, held_out_rows: int = 0) -> DraftVersion:
        """Write ``draft`` as the next version (files first, ``version.json`` last) and return it."""
        last = self.versions()
        version = DraftVersion(last[-1].version + 1 if last else 1, step, accept_length, held_out_rows, time.time())
        folder = self._join(version.name)
        if isinstance(self.fs, pafs.LocalFileSystem):
            draft.save_pretrained(folder)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                draft.save_pretrained(tmp)
                for f in sorted(Path(tmp).iterdir()):
                    pafs.copy_files(str(f), posixpath.join(folder, f.name), source_filesystem=pafs.LocalFileSystem(),
                                    destination_filesystem=self.fs)  # fmt: skip
        self._write_json(posixpath.join(folder, VERSION_FILE), asdict(version))
        return version

    def promote(self, version: DraftVersion, floor: float | None = None) -> bool:
        """Make ``version`` the promoted one if its held-out accept length is at least the current one's (a
        version without one is promoted only when nothing is); returns whether it was. ``floor``: the accept
        length to reach instead, that of the draft the engines decode with now measured on the same rows as
        ``version`` (a trainer's: the promoted version's own figure may come from other held-out rows)."""
        meta = self._read_json(self._join(PROMOTED_FILE)) or {"current": None, "history": []}
        current = meta["current"]
        if current is not None and version.version == current["version"]:
            return False
        if floor is None and current is not None:
            if version.accept_length is None:
                return False
            floor = current["accept_length"]
        if floor is not None and (version.accept_length is None or version.accept_length < floor):
            return False
        entry = {**asdict(version), "promoted_at": time.time()}
        self._write_json(self._join(PROMOTED_FILE), {"current": asdict(version), "history": [*meta["history"], entry]})
        return True


class DraftFollower:
    """What a running engine's owner calls between batches to follow a store: `poll` looks at the promoted
    version at most every ``poll_s`` seconds and returns ``(draft, name)`` when it is not the one held, so
    the caller swaps it in (`EngineLoop.swap_draft`). A version that fails to load is logged and tried again
    at the next poll; the engine keeps its draft."""

    def __init__(self, root: str, poll_s: float = 5.0, current: str | None = None):
        self.store, self.poll_s, self.current = DraftStore(root), poll_s, current
        self._next = 0.0  # monotonic time of the next look (0: the first poll looks)
        self._lock = threading.Lock()

    def poll(self):
        """``(EagleDraft, version name)`` of a newly promoted version, else None. Thread-safe: while one thread
        looks, another's poll returns None at once."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._poll()
        finally:
            self._lock.release()

    def _poll(self):
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.poll_s
        try:
            version = self.store.promoted()
            if version is None or version.name == self.current:
                return None
            draft = self.store.load(version)
        except Exception:  # a store being written or unreachable for a moment: keep the draft, look again later
            log.exception("draft store %s: could not load the promoted version", self.store.root)
            return None
        self.current = version.name
        return draft, version.name
