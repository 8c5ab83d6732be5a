"""The models' loading: which models are served (catalog), settings checked before a load
(preflight), memory estimated before a weight is read (fit), fingerprints of the files (fingerprint),
weights read into owned memory (reader, build), how a model holds them (weights, w8a8), the cache of
converted weights (weights_cache), and the tiny offline checkpoint (tiny)."""
