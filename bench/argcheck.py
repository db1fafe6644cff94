"""Parse a command line the way the command would, then stop before it runs (``gpu_check.sh --dry-run``).

    python bench/argcheck.py bench/views.py --device cuda --batches 40
    python bench/argcheck.py -m sslkit pretrain ccrl data.shards=DIR train.precision=bf16

A bench script is run up to its ``parse_args()`` call (its imports included), which then stops
it; an unknown flag or a bad value exits with argparse's message and status 2. For ``-m sslkit``
the sslkit command line is parsed, and for ``pretrain`` the recipe is loaded with its overrides
and validated as ``sslkit pretrain`` would (an unknown key or a bad value is a ConfigError),
without training. Prints ``ok: <command>`` when everything parsed.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


class _Parsed(Exception):
    """Raised in place of running the command, once its arguments have parsed."""


def _check_sslkit(argv: list[str]) -> None:
    from sslkit.cli import parse_args
    from sslkit.config import load_config, recipe_path

    args = parse_args(argv)
    if getattr(args, "fn", None) is not None and args.fn.__name__ == "_cmd_pretrain":
        load_config(recipe_path(args.config), args.overrides)


def _check_script(argv: list[str]) -> None:
    script = Path(argv[0])
    if not script.is_file():
        raise SystemExit(f"{script} does not exist.")
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args=None, namespace=None):  # noqa: ANN001, ANN202
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.parent))  # as when the script runs: its folder is importable
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed:
        return
    raise SystemExit(f"{script} finished without parsing a command line (nothing to check).")


def main() -> None:
    argv = sys.argv[1:]
    if not argv:
        raise SystemExit(__doc__)
    if argv[:2] == ["-m", "sslkit"]:
        _check_sslkit(argv[2:])
    else:
        _check_script(argv)
    print("ok:", " ".join(argv))


if __name__ == "__main__":
    main()
