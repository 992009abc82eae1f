"""`ledgerbc run` end to end: worker subprocesses, the stand-in dorado on PATH, real and hostile pod5 files."""
import collections
import gzip
import os
import shutil
import subprocess

import pytest
import sqlalchemy as sa

from helpers import (
    REAL_POD5, Study, assert_work_tree_clean, check_outputs, copy_real_pod5, events, files_by_rel, link_basename,
    query, read_bam,
)
from ledgerbc import chemistry, models
from ledgerbc.testkit.synth import HOSTILE_NAMES, make_dataset


def dorado_would_call(path) -> bool:
    """Would dorado >= 1.0 basecall this file alone with the `hac` variant (its chemistry has models)?"""
    return chemistry.check_call(chemistry.parse_model("hac"), [chemistry.read_run_info(path)]).ok


@pytest.mark.slow
def test_four_workers_drain_real_and_hostile_dataset_exactly_once(study: Study):
    copy_real_pod5(study.input / "real")
    synthetic = make_dataset(study.input, 300, hostile_names=True)
    assert set(HOSTILE_NAMES) <= set(synthetic)
    study.init("--batch-files", 8, "--min-qscore", 10)

    workers = [study.start_worker(f"w{i}") for i in range(4)]
    codes = study.wait_workers(workers, timeout=120)
    assert codes == {f"w{i}": 0 for i in range(4)}, {w: study.worker_log(w)[-2000:] for w in codes}

    rows = files_by_rel(study.ledger)
    on_disk = {p.relative_to(study.input).as_posix() for p in study.input.rglob("*.pod5")}
    assert set(rows) == on_disk and len(on_disk) == 333
    n_inputs = len(on_disk)
    # The real ONT files mix seven chemistries; dorado >= 1.0 has no model for some (R9.4.1, 4 kHz, RNA002,
    # unknown kits): those end failed after ONE dorado call per chemistry, with dorado's message; every
    # other file is done, and no dorado call mixed chemistries.
    refused = {rel for rel in on_disk if not dorado_would_call(study.input / rel)}
    assert refused and all(rel.startswith("real/") for rel in refused)
    dup_rel = next(rel for rel, r in rows.items() if r.state == models.DUPLICATE)
    failed = {rel for rel, r in rows.items() if r.state == models.FAILED}
    assert failed == refused - {dup_rel}, {rel: rows[rel].last_error for rel in failed ^ (refused - {dup_rel})}
    for rel in failed:
        assert "dorado refused the chemistry" in rows[rel].last_error and rows[rel].chemistry in rows[rel].last_error
        assert rows[rel].attempts <= 1
    assert {r.state for rel, r in rows.items() if rel not in refused} == {models.DONE}
    assert all(r.attempts == 0 for rel, r in rows.items() if rel not in refused)
    calls = [line for log in (study.output / "logs").glob("*.log") for line in log.read_text(errors="replace").splitlines()
             if "dorado refused" in line or "inhomogeneous" in line]
    assert not [c for c in calls if "inhomogeneous" in c], "a dorado call mixed chemistries"
    refused_batches = [e for e in events(study.ledger, "batch-failed")]
    assert len(refused_batches) == len({rows[rel].chemistry for rel in failed}), "more than one call per refused chemistry"

    # The real data holds one file twice (same pod5 file_identifier under two paths): recorded, no output.
    duplicates = [r for r in rows.values() if r.state == models.DUPLICATE]
    assert len(duplicates) == 1
    dup = duplicates[0]
    assert dup.rel_path.endswith("single_na24385.pod5")
    for kind in ("pass", "fail"):
        assert not (study.output / kind / (dup.rel_path[: -len(".pod5")] + ".fastq")).exists()

    outputs = check_outputs(study, "fastq", min_qscore=10)
    assert outputs.n_pass > 0 and outputs.n_fail > 0  # --min-qscore 10 exercises both folders
    # Hostile names came through verbatim: one output per input, under the same relative path.
    for rel in HOSTILE_NAMES:
        assert (study.output / "pass" / (rel[: -len(".pod5")] + ".fastq")).is_file(), rel
    # Split reads (real single_split_read.pod5 and one synthetic file in 50) count via their parent.
    split_parents = {r.parent for rel in outputs.passed for r in outputs.records(rel) if "pi" in r.tags}
    assert split_parents, "no split read in the dataset: the pi:Z path was not exercised"
    assert not list(study.root.rglob("pwned")), "a file name was run by a shell"

    status = study.status()
    assert status["files"]["done"] == len(outputs.passed) == n_inputs - 1 - len(failed)
    assert status["files"]["duplicate"] == 1
    assert status["files"]["pending"] == status["files"]["claimed"] == 0
    assert status["files"]["failed"] == len(failed)
    assert status["reads"]["pass"] == outputs.n_pass
    assert status["reads"]["fail"] == outputs.n_fail
    assert status["reads"]["out"] == outputs.n_pass + outputs.n_fail
    assert [d["path"] for d in status["duplicates"]] == [dup.rel_path]
    assert status["running_batches"] == []
    assert {w["worker_id"]: w["state"] for w in status["workers"]} == {f"w{i}": "exited" for i in range(4)}

    # Every done file was published by a done batch of one of the workers, and each worker's count of done
    # batches in `status` is the number of batch rows it finished (the worker row keeps no count of its own).
    done_batches = query(study.ledger, sa.select(models.Batch.id, models.Batch.worker_id)
                         .where(models.Batch.state == models.BATCH_DONE))
    by_worker = collections.Counter(worker_id for _id, worker_id in done_batches)
    assert set(by_worker) <= {f"w{i}" for i in range(4)}
    assert len(by_worker) > 1, "one worker did everything: no concurrency tested"
    assert {w["worker_id"]: w["batches_done"] for w in status["workers"]} == {f"w{i}": by_worker[f"w{i}"] for i in range(4)}
    done_ids = {batch_id for batch_id, _w in done_batches}
    assert {r.batch_id for r in files_by_rel(study.ledger).values() if r.state == models.DONE} <= done_ids
    assert_work_tree_clean(study)


def _small_dataset(study: Study) -> None:
    """24 synthetic files (hostile names first) and three real ones, one of them with a read dorado splits."""
    make_dataset(study.input, 24, seed=7, hostile_names=True)
    for rel in ("single_split_read/single_split_read.pod5", "single_channel_multi_read_pod5/filtered.pod5",
                "duplex/pod5/duplex.pod5"):  # 5 kHz R10.4.1 DNA, the chemistry of the synthetic files
        target = study.input / "real" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REAL_POD5 / rel, target)


def _stand_in_records(study: Study, env: dict) -> dict:
    """What the stand-in itself writes for every input: {read id: Record}, run on links to all inputs."""
    folder = study.root / "direct"
    folder.mkdir()
    for i, path in enumerate(sorted(study.input.rglob("*.pod5"))):
        (folder / f"{i:05d}_{link_basename(path.name)}").symlink_to(path)
    out = study.root / "direct.bam"
    with open(out, "wb") as stdout:
        proc = subprocess.run([str(study.bin / "dorado"), "basecaller", "hac", str(folder)], stdout=stdout,
                              stderr=subprocess.PIPE, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {r.read_id: r for r in read_bam(out)}


@pytest.mark.slow
@pytest.mark.parametrize("emit", ["bam", "fastq.gz"])
def test_emit_variants_publish_every_read_once(study: Study, emit):
    _small_dataset(study)
    study.init("--batch-files", 4, "--min-qscore", 10, "--emit", emit)
    workers = [study.start_worker(f"w{i}") for i in range(2)]
    assert study.wait_workers(workers, timeout=120) == {"w0": 0, "w1": 0}

    rows = files_by_rel(study.ledger)
    assert {r.state for r in rows.values()} == {models.DONE}
    outputs = check_outputs(study, emit, min_qscore=10)
    assert outputs.n_pass > 0 and outputs.n_fail > 0
    for path in (study.output / "pass").rglob("*"):
        if path.is_file():
            magic = path.read_bytes()[:2]
            assert magic == b"\x1f\x8b", f"{path} is not gzip/BGZF"  # BAM is BGZF, itself gzip
            if emit == "fastq.gz":
                with gzip.open(path, "rb") as fh:
                    head = fh.read(1)
                assert head in (b"@", b""), f"{path} is not gzipped FASTQ"

    # Every record keeps what the stand-in wrote: sequence, qualities and every tag (fn is the link name).
    direct = _stand_in_records(study, study.env())
    published = [r for rel in outputs.passed for r in outputs.records(rel)]
    assert {r.read_id for r in published} == set(direct)
    for r in published:
        expected = direct[r.read_id]
        assert (r.sequence, r.qualities) == (expected.sequence, expected.qualities)
        assert set(r.tags) == set(expected.tags)
        assert {k: v for k, v in r.tags.items() if k != "fn"} == {k: v for k, v in expected.tags.items() if k != "fn"}
        assert r.tags["fn"].split("_", 1)[1] == expected.tags["fn"].split("_", 1)[1]

    status = study.status()
    assert status["files"]["done"] == len(outputs.passed) == len(rows)
    assert (status["reads"]["pass"], status["reads"]["fail"]) == (outputs.n_pass, outputs.n_fail)
    assert status["reads"]["out"] == outputs.n_pass + outputs.n_fail
    assert_work_tree_clean(study)
    assert not os.path.exists(study.cwd / "pwned")
