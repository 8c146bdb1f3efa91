"""ONNX Runtime session settings: the one place they are written.

The server's ONNX runtime, the exporter's parity check and the runtime benchmark all build their sessions from
:func:`session_options`, so a benchmark ceiling or a parity run measures the graph exactly as the server runs it.
Importable without torch; ONNX Runtime itself is imported when a session is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def session_options(threads: int = 0) -> Any:
    """The ``onnxruntime.SessionOptions`` the server runs graphs with.

    Args:
        threads: intra-op threads of one run (0: ONNX Runtime's default).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning: a spinning pool burns the cores the event loop and
    # the other workers need (measured on 2 cores: 3.5x slower batches of 256 with spinning on).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only; our own logs say what was loaded
    return opts


def cpu_session(path: str | Path, threads: int = 0, options: Any = None) -> Any:
    """An ONNX Runtime session of the graph at ``path`` on the CPU provider, with :func:`session_options`
    (or ``options`` built from them, e.g. with profiling switched on)."""
    import onnxruntime as ort

    opts = session_options(threads) if options is None else options
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
