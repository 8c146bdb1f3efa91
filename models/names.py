"""Names shared by the command line and the modules that implement them, importable without torch.

`lma` builds every subcommand's parser on each call (`models/main.py`); keeping these lists here keeps
that cheap (no torch import just to show `--help` or to start `lma serve`).
"""

FORMATS = ("criteo", "criteo-csv", "avazu")
EMBEDDING_KINDS = ("full", "hash", "lma")
MODEL_KINDS = ("dlrm", "lr")  # the DLRM, and the linear reference (logistic regression over the same keys)
SEMANTIC_MODES = ("rows", "context")
PRESET_NAMES = ("criteo-kaggle", "small", "tiny")
LR_SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")
