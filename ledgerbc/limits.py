"""How far one ledger scales (README "How far one ledger scales", docs/benchmarks.md "Scale limit").

The one place that holds the figure; `ledgerbc doctor` (live workers) and `ledgerbc submit` (--tasks) warn
when a study approaches it.
"""

# bench/scale_limit.py on GlusterFS (two mounts, the CI machine of docs/benchmarks.md): with ledgerbc's default
# 20 GiB batches, 60 s heartbeat and 15 min lease, the GPU time that workers lose waiting for and holding the
# ledger lock between batches passes 1% at about this many concurrent workers. Re-measure it with that script
# on your own filesystem: a faster file server moves it up.
LEDGER_WORKERS_LIMIT = 4_500
WARN_SHARE = 0.8  # warn from this share of the limit on


def approaching(workers: int) -> bool:
    return workers >= WARN_SHARE * LEDGER_WORKERS_LIMIT


def warning(workers: int, what: str) -> str | None:
    """One line for `what` (e.g. "--tasks 9000") when `workers` approaches the limit, else None."""
    if not approaching(workers):
        return None
    return (f"{what}: one ledger loses about 1% of GPU time to coordination at ~{LEDGER_WORKERS_LIMIT:,} concurrent "
            "workers (bench/scale_limit.py). Split the study into several ledgers (one INPUT_DIR/OUTPUT_DIR each), "
            "or use larger batches (--batch-size).")
