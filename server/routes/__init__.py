"""Operations routes (admin, metrics) and what every FastAPI route needs (:mod:`server.routes.deps`).

The protocol routes live with their protocols (:mod:`server.protocols`); :func:`server.app.build_app`
includes them all.
"""
