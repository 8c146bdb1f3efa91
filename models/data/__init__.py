"""Data: readers for Criteo and Avazu files, the parsed-array cache that training reads, splits and batches.

Modules, from the file to the model; each imports only the ones above it, so the serving side (the
feature-store bulk load, load-test payloads) imports :mod:`models.data.reader` without the cache,
NumPy memory maps or torch:

- :mod:`models.data.formats`: the file formats, skip reasons and :class:`~models.data.formats.ReadStats`;
- :mod:`models.data.lines`: bytes -> blocks of clean text lines (gzip, BOM, CRLF, bad bytes, overlong lines);
- :mod:`models.data.parse`: a block of lines -> columns, in one compiled pass (Numba);
- :mod:`models.data.keys`: categorical columns -> token keys, through a per-thread cache of the schema's hash;
- :mod:`models.data.reader`: the public readers :func:`~models.data.reader.iter_raw` (raw values) and
  :func:`~models.data.reader.iter_chunks` (model-ready arrays), blocks parsed on a thread pool;
- :mod:`models.data.cache`: :func:`~models.data.cache.prepare`, a file parsed once into memory-mapped
  arrays (:class:`~models.data.cache.Prepared`, with its train/val/test splits);
- :mod:`models.data.batches`: training batches (sharded for data-parallel ranks) and distinct tokens.

docs/DATA.md describes the formats, the cache and the measured speed.
"""
