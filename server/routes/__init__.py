"""The whole HTTP surface: native (/v1), Open Inference Protocol v2 (/v2), admin, metrics."""

from server.routes import admin, metrics, native, v2

ROUTERS = (native.router, admin.router, v2.router, metrics.router)
