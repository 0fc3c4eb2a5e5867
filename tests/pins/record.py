"""Record the figures every study writes at `--scale debug`, or compare them with the recorded ones.

    python tests/pins/record.py            # compare this tree's figures with tests/pins/figures.json
    python tests/pins/record.py --write    # record them (before a refactor)

Each study runs in its own process with one thread (same seeds, same arithmetic), and only the
numbers of its results.json that do not depend on the clock or the machine are kept: timings,
throughputs, memory and dates are left out. `tests/pins/test_pins.py` (marked slow) runs the compare.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures.json"

STUDIES: dict[str, list[str]] = {
    "experiment bytes": ["experiment", "bytes"],
    "experiment induction": ["experiment", "induction"],
    "experiment nsweep": ["experiment", "nsweep"],
    "experiment polynomial": ["experiment", "polynomial"],
    "lab tasks": ["lab", "tasks"],
    "lab surprisal": ["lab", "surprisal"],
    "lab induction-heads": ["lab", "induction-heads"],
    "lab think": ["lab", "think"],
    "lab icl": ["lab", "icl"],
    "lab emergence": ["lab", "emergence"],
    "lab mutual-information": ["lab", "mutual-information"],
    "lab choice-points": ["lab", "choice-points"],
    "lab horizon": ["lab", "horizon"],
    "lab scaling run": ["lab", "scaling", "run"],
}
"""Every study command, run as `multitoken ARGS --scale debug --out DIR --device cpu`."""

CLOCK = re.compile(
    r"second|_s$|per_s|_ms|time|speed|memory|mib|date|machine|command|wall|throughput|elapsed|written"
)
"""Keys whose values depend on the clock or the machine, not on the arithmetic."""
STAMP = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+(\+00:00|Z)?")
"""A timestamp inside a text (replaced by `<time>`)."""


def keep(value, key: str = ""):
    """The value with clock- and machine-dependent entries left out (recursively); paths become names."""
    if CLOCK.search(key.lower()):
        return None
    if isinstance(value, dict):
        kept = {k: keep(v, str(k)) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None}
    if isinstance(value, list):
        return [keep(v) for v in value]
    if isinstance(value, str):
        value = STAMP.sub("<time>", value)
        return Path(value).name if "/" in value and " " not in value else value
    return value


def run_study(args: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "multitoken", *args, "--scale", "debug", "--out", str(out)]
    argv += ["--device", "cpu"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    payload = json.loads((out / "results.json").read_text())
    return keep({"results": payload["results"], "details": payload.get("details", {})})


def record(names: list[str]) -> dict:
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"running {name}", flush=True)
            figures[name] = run_study(STUDIES[name], Path(tmp) / name.replace(" ", "-"))
    return figures


def differences(old, new, where: str = "") -> list[str]:
    """Paths where two recorded figure trees differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = [f"{where}/{k}: missing" for k in old.keys() - new.keys()]
        found += [f"{where}/{k}: new" for k in new.keys() - old.keys()]
        for k in old.keys() & new.keys():
            found += differences(old[k], new[k], f"{where}/{k}")
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for d in differences(a, b, f"{where}[{i}]")
        ]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("--")] or list(STUDIES)
    figures = record(names)
    if "--write" in argv:
        stored = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
        FIGURES.write_text(json.dumps(stored | figures, indent=1, sort_keys=True) + "\n")
        print(f"wrote {FIGURES}")
        return 0
    stored = json.loads(FIGURES.read_text())
    found = [d for name in names for d in differences(stored[name], figures[name], name)]
    print("\n".join(found) or "all figures unchanged")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
