"""Strip outputs, execution counts and execution metadata from notebooks (before a commit).

    python notebooks/strip_outputs.py            # every notebooks/*.ipynb, in place
    python notebooks/strip_outputs.py a.ipynb    # the given files
    python notebooks/strip_outputs.py --check    # exit 1, listing them, if any notebook holds outputs

Cell tags (the ``parameters`` cell that the tests override) and the notebook's kernelspec are kept.
Needs ``nbformat`` (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

CELL_METADATA_DROPPED = ("execution", "collapsed", "scrolled", "ExecuteTime")


def strip(nb) -> bool:
    """Strip ``nb`` in place; True when something was removed."""
    changed = False
    for cell in nb.cells:
        for key in CELL_METADATA_DROPPED:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
        if cell.cell_type == "code":
            if cell.outputs or cell.execution_count is not None:
                changed = True
            cell.outputs = []
            cell.execution_count = None
    if "widgets" in nb.metadata:
        del nb.metadata["widgets"]
        changed = True
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="only report notebooks that hold outputs")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(Path(__file__).resolve().parent.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    for path in dirty:
        print(f"{'has outputs' if args.check else 'stripped'}: {path}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
