"""captrt.batch: caption a corpus into Parquet/JSON-lines shards, resumable, locally or on Ray.

    from captrt.batch import run_batch
    result = run_batch(["photos/"], "MODEL_DIR", "out/", resume=True)

Local mode needs only the runtime (plus pyarrow for Parquet); Ray mode needs the `ray` extra.
Neither ray nor pyarrow is imported until a run needs them.
"""

from captrt.batch.api import (EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, BatchResult, BatchUsageError,
                              run_batch)

__all__ = ["BatchResult", "BatchUsageError", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SOME_FAILED", "EXIT_USAGE",
           "run_batch"]
