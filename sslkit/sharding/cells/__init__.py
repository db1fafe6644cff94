"""``sslkit shard cells``: one square crop per nucleus, from instance maps or boxes.

- ``command``: ``CellSource`` (crop windows, class maps, the formats), the flags, ``add_parser``.
- ``annotations``: reading each format's annotations into nuclei (instance maps, boxes).
- ``pairing``: which image goes with which annotation file.
"""

from sslkit.sharding.cells.command import add_parser

__all__ = ["add_parser"]
