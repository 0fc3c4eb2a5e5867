"""`multitoken serve` without its extra: one line naming the extra, exit status 2."""

import sys

from multitoken.cli import main


def test_serve_without_the_extra_names_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # makes `import fastapi` raise ImportError
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'multitoken[serve]'" in err
