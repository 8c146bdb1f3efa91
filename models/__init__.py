"""Feature schema, data, embeddings (full, hash, LMA), DLRM, training and evaluation."""
