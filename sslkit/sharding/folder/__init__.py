"""``sslkit shard folder``: image folders as shards, labels from class folders, a CSV or a regex.

- ``command``: ``FolderSource`` (padding to a square, resizing), ``shard_folder``, the flags, ``add_parser``.
- ``plan``: which files, labels, groups, classes and splits (nothing is decoded there).
"""

from sslkit.sharding.folder.command import add_parser

__all__ = ["add_parser"]
