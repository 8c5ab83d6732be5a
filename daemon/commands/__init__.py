"""The command line, one module per command group: `serve` (serve), the client commands `embed`,
`rerank`, `health` and `calibrate` (calls), `embed-dataset` (dataset), and `tiny-checkpoint` and
`keygen` (tools). daemon/main.py is the entry point that puts them in one group."""
