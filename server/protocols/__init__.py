"""The protocol families the server speaks, each with its codec, routes and schemas side by side.

- :mod:`server.protocols.native`: ``POST /v1/models/{name}:predict`` and ``POST /v1/predict`` (instances of
  raw values), ``GET /v1/models``;
- :mod:`server.protocols.v2`: the Open Inference Protocol v2 (KServe / Triton REST): health, metadata and
  ``POST /v2/models/{name}[/versions/{version}]/infer``.

The scoring routes of both are rows of one table (:mod:`server.protocols.routing`), which drives their
dispatch and their entries in the OpenAPI document.
"""
