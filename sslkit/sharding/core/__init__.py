"""What every shard importer shares; nothing here imports OpenSlide or scipy.

- ``source``: the ``Source`` protocol (units of work that yield ``Sample`` s) and key helpers.
- ``runner``: ``run_source``: units over ranks, ranks over workers, resumable, one manifest;
  the flags every ``sslkit shard`` command shares.
- ``pool``: worker processes from a fork server, and the progress display.
- ``journal``: which units and shards are final, so a re-run resumes.
- ``writer``: samples into tar shards, atomically (``ShardFiles``, ``ShardSetWriter``).
- ``splits``: group-wise train/val/test splits (``--split``).
- ``imaging``: reading, resizing and padding images.
- ``stain``: Macenko stain normalisation (``--stain-normalize``).
- ``verify``: ``sslkit shard verify``: shards re-hashed and re-counted against their manifest.
"""
