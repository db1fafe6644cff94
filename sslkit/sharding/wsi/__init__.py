"""``sslkit shard wsi``: whole-slide images to tissue tiles at a target um/px.

- ``command``: ``WsiSource`` (tile planning and reading per slide), the flags, ``add_parser``.
- ``slides``: opening slides (OpenSlide, TiffSlide, stored TIFF tiles), resolution and levels.
- ``files``: finding slide files (folders, ``@list.txt``) and their unit ids.
- ``tissue``: the tissue mask and the inspection images under ``OUT/masks``.
"""

from sslkit.sharding.wsi.command import add_parser

__all__ = ["add_parser"]
