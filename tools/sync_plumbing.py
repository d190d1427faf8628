"""Copy the appendix of one script into the other four.

The appendix (from the banner line above `# APPENDIX: the same text in all five scripts` to the
end of the file) is the same text in all five algorithm scripts; tests/test_plumbing.py fails when
they differ. Fix it in one script, then run

    python tools/sync_plumbing.py [--from dreamerv2] [--only blast ...]

to make the same change in the others (each keeps everything above its banner).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("dreamerv2", "core", "cvrl", "blast", "dreamingv2")
MARKER = "# APPENDIX: the same text in all five scripts"


def split(text: str, name: str) -> tuple[str, str]:
    """(the method part, the appendix from its banner line)."""
    if MARKER not in text:
        raise SystemExit(f"error: {name} has no line '{MARKER}'; add the appendix by hand first")
    at = text.index(MARKER)
    start = text.rindex("\n", 0, text.rindex("\n", 0, at)) + 1
    return text[:start], text[start:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", default="dreamerv2", choices=SCRIPTS)
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="copy into these scripts only")
    args = parser.parse_args()
    _, block = split((ROOT / f"{args.source}.py").read_text(), f"{args.source}.py")
    for script in args.only or SCRIPTS:
        path = ROOT / f"{script}.py"
        if MARKER not in path.read_text():
            print(f"{path.name}: no appendix yet, left as it is")
            continue
        method, old = split(path.read_text(), path.name)
        if old != block:
            path.write_text(method + block)
            print(f"{path.name}: appendix replaced")


if __name__ == "__main__":
    main()
