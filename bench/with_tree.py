"""Run a bench module with the `daemon` package of another checkout (its client), for before/after rows.

    git worktree add /tmp/before REV
    .venv/bin/python -m bench.with_tree /tmp/before bench.failover --timeout 20

The editable install's import hook, which would give this checkout's `daemon` whatever the path
says, is set aside; the bench itself and the daemons it starts are this checkout's.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    tree, module = sys.argv[1], sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
    sys.path[:0] = [tree, "."]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
