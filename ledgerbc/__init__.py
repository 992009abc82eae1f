"""ledgerbc: exactly-once dorado basecalling across Slurm array tasks, coordinated by one SQLite ledger."""

__version__ = "0.1.0"
