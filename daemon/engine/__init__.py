"""The engine: admission and the model thread (engine), cross-request batching by priority
(batching), which models are in memory (residency), the backends it runs (backends), and its
counters (metrics). It sees no transport and no op: handlers give it jobs."""
