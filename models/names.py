"""Names shared by the command line and the modules that implement them, importable without torch.

`lma` builds every subcommand's parser on each call (`models/main.py`); keeping these lists here keeps
that cheap (no torch import just to show `--help` or to start `lma serve`).
"""

FORMATS = ("criteo", "criteo-csv", "avazu")
EMBEDDING_KINDS = ("full", "hash", "lma")
SEMANTIC_MODES = ("rows", "context")
PRESET_NAMES = ("criteo-kaggle", "small", "tiny")
