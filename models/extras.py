"""The optional parts of the install (pyproject.toml's extras) and the one error for a missing one.

``pip install lma-ctr`` is the serving set (``lma serve``, ``features``, ``publish``, ``bench``);
training and export need ``[train]``, the TorchScript runtime ``[torchscript]``, tests and load tools
``[dev]``. Code that needs an extra either checks for it first with :func:`check`, or its
``lma`` subcommand names the extra (``set_defaults(extra="train")``, see ``models/main.py``) so that
a module of that extra missing at run time becomes one line naming what to install, never a traceback.

``EXTRA_MODULES`` lists the top-level modules each extra brings (tests/test_install.py checks it
against pyproject.toml), so a module missing for another reason (a bug) is not mistaken for a missing
extra.
"""

from __future__ import annotations

import importlib.util

EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("torch", "safetensors", "onnx", "onnxscript", "matplotlib", "tqdm"),
    "torchscript": ("torch",),
}


class MissingExtra(ImportError):
    """``what`` needs a module of the ``extra`` optional dependency group, and it is not installed."""

    def __init__(self, what: str, extra: str, module: str) -> None:
        self.what, self.extra, self.module = what, extra, module
        super().__init__(
            f"{what} needs the [{extra}] extra (module {module!r} is not installed):"
            f" pip install 'lma-ctr[{extra}]' (in a checkout: make setup)"
        )


def missing_module(error: ModuleNotFoundError, extra: str) -> str | None:
    """The top-level module of ``extra`` whose absence raised ``error``, or None if it is another module."""
    top = (error.name or "").split(".")[0]
    return top if top in EXTRA_MODULES[extra] else None


def check(module: str, extra: str, what: str) -> None:
    """:class:`MissingExtra` unless ``module`` (of ``extra``) is installed; nothing is imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(what, extra, module)
