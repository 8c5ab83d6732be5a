"""Compact outputs: the embedding encodings (encodings), their calibration from a sample
(calibrate), and the embedding cache (cache)."""
