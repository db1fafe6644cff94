"""The one atomic-write helper: a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sslkit.atomic import replacing, temporary_name, write_json, write_text


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"ami": 0.5})
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"ami": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_the_temporary_keeps_the_suffix_so_format_sniffing_writers_work(tmp_path):
    target = tmp_path / "sub" / "embeddings.npy"  # np.save appends .npy to a name without it
    assert temporary_name(target).suffix == ".npy" and temporary_name(target).name.startswith(".")
    with replacing(target) as tmp:
        np.save(tmp, np.arange(4))
    assert np.load(target).tolist() == [0, 1, 2, 3]
    assert [p.name for p in target.parent.iterdir()] == ["embeddings.npy"]


def test_fsync_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    target = write_text(tmp_path / "report.html", "old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sslkit.atomic.os.fsync", disk_full)
    with pytest.raises(OSError):
        write_text(target, "new", fsync=True)
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1
