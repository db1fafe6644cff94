"""Writing shard sets (``sslkit shard ...``), one sub-package per kind of input.

- ``core``: what every importer shares: ``runner`` (ranks, resume, the manifest at the end),
  ``pool`` (worker processes), ``journal`` (which units are final), ``writer`` (tar shards),
  ``source`` (the ``Source`` protocol: units that yield samples), ``splits`` (group-wise
  train/val/test), ``imaging`` (image files to arrays), ``stain`` (Macenko normalisation)
  and ``verify`` (``sslkit shard verify``).
- ``wsi``: ``sslkit shard wsi``, whole-slide images to tissue tiles (OpenSlide, TiffSlide).
- ``cells``: ``sslkit shard cells``, one crop per nucleus from annotated tiles (scipy).
- ``folder``: ``sslkit shard folder``, image folders with labels from class folders, a CSV or a regex.
- ``synthetic``: ``sslkit shard synthetic``, the demo's procedural crops.

Each importer package holds ``command`` (its ``Source``, flags and ``add_parser``) and the
modules only it needs; its ``__init__`` exposes ``add_parser`` for ``sslkit.cli``, which
imports the importers only when the ``shard`` command runs. The shard format itself (the
manifest, tar member rules) is ``sslkit.shardformat``, shared with the readers in ``sslkit.data``.
"""
