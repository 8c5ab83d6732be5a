"""`qwen3vl-daemon embed-dataset`: embed every row of a JSONL or Parquet file into a Parquet dataset,
resumably. rows.py reads INPUT, store.py owns the output directory, batches.py turns replies into
rows and errors, job.py runs it over daemons (local mode), ray_job.py as a Ray Data pipeline, and
progress.py reports how it goes."""
