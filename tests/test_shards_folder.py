"""The top-level shards/ folder: the default home of shard sets, documented, its contents ignored by git."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from sslkit import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "shards" / "README.md"


def test_the_demo_writes_its_shards_under_shards():
    assert cli.parse_args(["demo"]).shards == "shards/demo"
    assert README.is_file()


def test_every_command_the_readme_gives_is_a_real_command_into_shards():
    commands = [shlex.split(c) for c in re.findall(r"`(sslkit shard [^`]+)`", README.read_text())]
    sources = {c[2] for c in commands}
    assert sources >= {"synthetic", "wsi", "cells", "folder", "verify"}
    for command in commands:
        args = cli.parse_args(command[1:])
        target = getattr(args, "out", None) or getattr(args, "folder", None)
        assert target.startswith("shards/"), command


def test_git_tracks_only_the_readme_of_shards():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["shards/README.md", "shards/demo/train/demo-000000.tar", "shards/consep/manifest.json", "shards/x.tar"]
    result = subprocess.run(["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *names], cwd=ROOT,
                            capture_output=True, text=True)
    # One row per name, "FILE:LINE:PATTERN<TAB>NAME"; a "!PATTERN" keeps the name, no pattern ignores nothing.
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    patterns = {name: source.split(":", 2)[-1] for source, name in rows}
    ignored = {name for name, pattern in patterns.items() if pattern and not pattern.startswith("!")}
    assert ignored == set(names[1:]), result.stdout
