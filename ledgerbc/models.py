"""The ledger's tables. Times are epoch seconds (float) as seen by the process that wrote them.

State machine of a pod5 file (every change goes through `claim.py` or `janitor.py`):

    waiting --(complete)--> pending --claim--> claimed --publish--> done
                                ^                 |  \\--fail (attempts < max)--> pending
                                |                 |   \\-fail (attempts >= max)--> failed --retry--> pending
                                +----release------+
    duplicate: the same pod5 (file_identifier) under another path; never basecalled.
    gone: an original that vanished from INPUT_DIR before it was basecalled; a copy became the original.

A file's identity is its `rel_path` plus its `file_identifier`: row ids are renumbered by a rebuild and
never decide which file a publication marks done (claim.py).
"""

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# pod5 file states
WAITING = "waiting"  # seen while following a live run, not complete yet
PENDING = "pending"
CLAIMED = "claimed"
DONE = "done"
FAILED = "failed"
DUPLICATE = "duplicate"
GONE = "gone"
FILE_STATES = (WAITING, PENDING, CLAIMED, DONE, FAILED, DUPLICATE, GONE)

# batch states
RUNNING = "running"
BATCH_DONE = "done"
RELEASED = "released"  # given back by its worker (SIGTERM, shutdown): no attempt counted
RECLAIMED = "reclaimed"  # taken back by a janitor after its lease expired
BATCH_FAILED = "failed"  # dorado failed on it; its files were retried or failed
BATCH_STATES = (RUNNING, BATCH_DONE, RELEASED, RECLAIMED, BATCH_FAILED)

# worker states
WORKER_RUNNING = "running"
WORKER_EXITED = "exited"

# output kinds (outputs.kind)
PASS = "pass"
FAIL = "fail"
SUMMARY = "summary"
OUTPUT_KINDS = (PASS, FAIL, SUMMARY)


class Base(DeclarativeBase):
    pass


class Setting(Base):
    """What `init` was given, one JSON value per key."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Pod5File(Base):
    __tablename__ = "pod5_files"
    __table_args__ = (
        # The queue, oldest first (migration 0005): one index that every state change writes, read by the claim
        # for the oldest pending files and for a chemistry's own. It holds all the claim reads of them (size and
        # isolate too, migration 0006), so that read never looks up the table (claim._PENDING_COLUMNS).
        Index("ix_pod5_files_queue", "state", "id", "chemistry", "size", "isolate"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rel_path: Mapped[str] = mapped_column(Text, unique=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    read_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    file_identifier: Mapped[str | None] = mapped_column(String, nullable=True, index=True)
    state: Mapped[str] = mapped_column(String)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"), nullable=True)
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("pod5_files.id"), nullable=True)
    reads_pass: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reads_fail: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reads_missing: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bases: Mapped[int | None] = mapped_column(Integer, nullable=True)
    added_at: Mapped[float] = mapped_column(Float)
    done_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # follow mode: when size and mtime were last seen to change (settle time counts from here)
    stable_since: Mapped[float | None] = mapped_column(Float, nullable=True)
    # run info, read at scan from every read group of the file (DESIGN §4: one chemistry per batch)
    flow_cell_product_code: Mapped[str | None] = mapped_column(String, nullable=True)
    sequencing_kit: Mapped[str | None] = mapped_column(String, nullable=True)
    sample_rate: Mapped[int | None] = mapped_column(Integer, nullable=True)
    chemistry: Mapped[str | None] = mapped_column(String, nullable=True)  # the batch key (chemistry.py)
    samples: Mapped[int | None] = mapped_column(Integer, nullable=True)  # signal samples of all its reads
    isolate: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # claim it alone


class Batch(Base):
    """A claim. Its id and nonce are the fencing token. A new id is above every id in the table and above the
    floor a rebuild sets (`db.BATCH_IDS_HANDED_OUT_SQL`: the header's user_version); no AUTOINCREMENT, whose
    counter was one more page to journal per claim (migration 0005)."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_state", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[str] = mapped_column(String)
    state: Mapped[str] = mapped_column(String)
    claimed_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_files: Mapped[int] = mapped_column(Integer)
    n_bytes: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The fencing token is (id, token): a random nonce, so that even an id handed out again after a rebuild
    # (a claim that left no trace on disk) never matches the zombie that holds the old one.
    token: Mapped[str | None] = mapped_column(String, nullable=True)
    chemistry: Mapped[str | None] = mapped_column(String, nullable=True)
    model: Mapped[str | None] = mapped_column(String, nullable=True)
    dorado_version: Mapped[str | None] = mapped_column(String, nullable=True)
    gpus: Mapped[str | None] = mapped_column(String, nullable=True)  # CUDA_VISIBLE_DEVICES it ran with


class Worker(Base):
    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String, primary_key=True)
    host: Mapped[str] = mapped_column(String)
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String, nullable=True)
    started_at: Mapped[float] = mapped_column(Float)
    # Written at registration, heartbeats, exit, and by a claim only when its process has not written it within
    # a heartbeat interval (claim._Recent).
    last_seen: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String)  # running | exited
    # No longer counted (a page per publication): status counts a worker's done batches. Kept for old ledgers.
    batches_done: Mapped[int] = mapped_column(Integer, default=0)
    dorado_version: Mapped[str | None] = mapped_column(String, nullable=True)
    gpus: Mapped[str | None] = mapped_column(String, nullable=True)


class Role(Base):
    """A singleton job held by one worker at a time (the watchman, the follow-mode scanner)."""

    __tablename__ = "roles"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    worker_id: Mapped[str] = mapped_column(String)
    heartbeat_at: Mapped[float] = mapped_column(Float)


class Event(Base):
    """Append-only history: claims, publications, failures, reclaims, rebuilds."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String)
    worker_id: Mapped[str | None] = mapped_column(String, nullable=True)
    batch_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    file_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)


class Output(Base):
    """One published output file of a done input: pass/fail (per barcode when barcoded) or its summary.

    Written in the publication's transaction; `verify` checks files against these rows, and status,
    finalize and the report add them up (per file x barcode read and base counts).
    """

    __tablename__ = "outputs"
    __table_args__ = (Index("ix_outputs_file_id", "file_id"), Index("ix_outputs_barcode", "barcode"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("pod5_files.id"))
    batch_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    kind: Mapped[str] = mapped_column(String)  # pass | fail | summary
    barcode: Mapped[str | None] = mapped_column(String, nullable=True)  # the <barcode> folder; None unbarcoded
    path: Mapped[str] = mapped_column(Text)  # relative to OUTPUT_DIR
    reads: Mapped[int] = mapped_column(Integer)
    bases: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(Integer)
    checksum: Mapped[str | None] = mapped_column(String, nullable=True)  # "crc32:<8 hex>" of the bytes


class BarcodeYield(Base):
    """Output files, reads and bases published per barcode and kind (pass | fail) in a barcoded study.

    Kept by triggers on `outputs` (migration 0004) in the transaction that writes the rows, so it always
    equals the sums over `outputs`; `status` reads it instead of aggregating every file's outputs.
    """

    __tablename__ = "barcode_yields"

    barcode: Mapped[str] = mapped_column(String, primary_key=True)
    kind: Mapped[str] = mapped_column(String, primary_key=True)  # pass | fail
    outputs: Mapped[int] = mapped_column(Integer, server_default="0")
    reads: Mapped[int] = mapped_column(Integer, server_default="0")
    bases: Mapped[int] = mapped_column(Integer, server_default="0")
