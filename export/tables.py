"""The in-graph hash tables of a model, as the exporter sees them: which keys they store (parity rows exercise
those hits) and how full they are (the manifest's ``tables`` entry).

Found by walking the model's modules, so any model that embeds keys with :mod:`models.embeddings` (DLRM, a linear
model over the same keys) exports without code here knowing its class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from models.embeddings import FullEmbedding, SharedMemoryEmbedding
from models.hashtable import StaticHashTable


def key_tables(model: nn.Module) -> list[tuple[str, nn.Module, StaticHashTable]]:
    """(role, embedding, table) of every embedding of the model: the signature table of a hash/lma embedding
    (``signature_table``), the vocabulary index of a full one (``vocabulary_index``)."""
    found: list[tuple[str, nn.Module, StaticHashTable]] = []
    for module in model.modules():
        if isinstance(module, SharedMemoryEmbedding):
            found.append(("signature_table", module, module.signatures))
        elif isinstance(module, FullEmbedding):
            found.append(("vocabulary_index", module, module.vocabulary))
    return found


def key_table(model: nn.Module) -> tuple[str, StaticHashTable]:
    """(role, table) of the model's one embedding (:func:`key_tables`); ValueError when it has none or several."""
    tables = key_tables(model)
    if len(tables) != 1:
        raise ValueError(f"expected one embedding table in {type(model).__name__}, found {len(tables)}")
    role, _, table = tables[0]
    return role, table


def stored_keys(model: nn.Module) -> np.ndarray:
    """Keys the model's tables store (signatures for lma, vocabulary for full): table hits to exercise."""
    keys = [table.table_keys.numpy().ravel() for _, _, table in key_tables(model)]
    all_keys = np.concatenate(keys) if keys else np.empty(0, dtype=np.int64)
    return all_keys[all_keys >= 0]


def table_stats(model: nn.Module) -> dict[str, Any]:
    """Occupancy of each in-graph hash table, and the sizes of the embedding around it."""
    stats: dict[str, Any] = {}
    for role, emb, table in key_tables(model):
        stored = int((table.table_keys >= 0).sum().item())
        capacity = table.num_buckets * table.slots
        stats[role] = {
            "buckets": table.num_buckets,
            "slots": table.slots,
            "stored_keys": stored,
            "load": stored / capacity if capacity else 0.0,
            "bytes": table.memory_bytes,
        }
        if isinstance(emb, SharedMemoryEmbedding):
            stats |= {"memory_floats": emb.memory_size, "block_size": emb.block_size}
        elif isinstance(emb, FullEmbedding):
            stats |= {"rows": int(emb.weight.shape[0]), "vocab_size": int(emb.vocab_size)}
    return stats
