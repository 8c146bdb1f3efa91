"""FastAPI serving of exported bundles: batching, runtimes, metrics, hot swap, feature store."""
