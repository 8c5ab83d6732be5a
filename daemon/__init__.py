"""qwen3vl-daemon: Qwen3-VL embedding and reranking behind a ZeroMQ socket."""

__version__ = "0.1.0"
