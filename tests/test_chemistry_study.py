"""One chemistry per dorado call, models per chemistry, a pinned dorado version (issue 12, DESIGN §4, §5).

Real workers (`ledgerbc run` subprocesses) with the chemistry-checking stand-in dorado, on the real ONT
files of ../shared/testdata/real-pod5 (seven chemistries, some that dorado >= 1.0 refuses) and synthetic
files of supported chemistries. Outcomes are read from the outputs (read ids), the ledger, the batch logs
and `status --json`.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
from click.testing import CliRunner

from helpers import (
    Study, assert_work_tree_clean, check_outputs, copy_real_pod5, events, files_by_rel, pod5_read_ids, query,
    read_fastq,
)
from ledgerbc import chemistry, dorado, models, modelplan, provenance
from ledgerbc.cli import cli
from ledgerbc.errors import BadInput
from ledgerbc.settings import Settings
from ledgerbc.testkit import synth

DNA_MODEL = "dna_r10.4.1_e8.2_400bps_hac@v5.0.0"
RNA_MODEL = "rna004_130bps_sup@v5.1.0"
NBD_KEY = chemistry.RunInfoKey(*synth.DNA_5KHZ_NBD).key
RNA_KEY = chemistry.RunInfoKey(*synth.RNA004).key


def dorado_calls(study: Study) -> dict[int, list[str]]:
    """{batch id: the lines of its log}, for every batch dorado was started for."""
    return {int(log.stem): log.read_text(errors="replace").splitlines()
            for log in (study.output / "logs").glob("*.log")}


def batch_chemistry(study: Study) -> dict[int, str]:
    return {b.id: b.chemistry for b in query(study.ledger, models.Batch.__table__.select())}


def hac_would_run(path) -> bool:
    """Would dorado >= 1.0 basecall this file alone with the `hac` variant?"""
    return chemistry.check_call(chemistry.parse_model("hac"), [chemistry.read_run_info(path)]).ok


# -- init refuses what breaks the contract ---------------------------------------------------------------
@pytest.mark.parametrize("args, instead", [
    (["--min-qscore", "9"], "ledgerbc init --min-qscore Q"),
    (["--min-qscore=9"], "ledgerbc init --min-qscore Q"),
    (["--emit-fastq"], "ledgerbc init --emit fastq"),
    (["--emit-sam"], "ledgerbc init --emit bam"),
    (["--output-dir", "/tmp/x"], "OUTPUT_DIR argument of `ledgerbc init`"),
    (["-o/tmp/x"], "OUTPUT_DIR argument of `ledgerbc init`"),
    (["--resume-from", "old.bam"], "ledgerbc recover"),
    (["--device", "cuda:1"], "ledgerbc run --device"),
    (["-x", "cuda:all"], "ledgerbc run --device"),
    (["--models-directory", "/m"], "ledgerbc init --models-directory DIR"),
    (["--kit-name", "SQK-NBD114-96"], "ledgerbc init --kit-name KIT"),
    (["--sample-sheet", "s.csv"], "ledgerbc init --sample-sheet CSV"),
    (["--max-reads", "10"], "every read of every input"),
    (["--reference", "ref.fa"], "dorado aligner"),
])
def test_init_refuses_a_dorado_arg_that_breaks_the_contract(tmp_path, args, instead):
    (tmp_path / "in").mkdir()
    argv = ["init", tmp_path / "in", tmp_path / "out"] + [a for arg in args for a in ("--dorado-arg", arg)]
    result = CliRunner().invoke(cli, [str(a) for a in argv], env={"PATH": "/usr/bin:/bin"})
    assert result.exit_code == 3, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: --dorado-arg {args[0]} is refused"), lines
    assert instead in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "out").exists(), "a refused init created OUTPUT_DIR"


def test_init_says_every_refused_dorado_arg_one_line_each_and_keeps_harmless_ones(tmp_path):
    (tmp_path / "in").mkdir()
    argv = ["init", tmp_path / "in", tmp_path / "out", "--dorado-arg", "--emit-fastq", "--dorado-arg", "--batchsize",
            "--dorado-arg", "64", "--dorado-arg", "--device=cuda:0", "--dorado-arg", "--recursive"]
    result = CliRunner().invoke(cli, [str(a) for a in argv], env={"PATH": "/usr/bin:/bin"})
    assert result.exit_code == 3
    assert [line.split(" is refused")[0] for line in result.stderr.splitlines()] == [
        "Error: --dorado-arg --emit-fastq", "Error: --dorado-arg --device=cuda:0"]
    assert not (tmp_path / "out").exists()
    assert dorado.refused_args(["--batchsize", "64", "--recursive", "-r", "--no-trim", "-v", "--modified-bases", "6mA"]) == []


# -- models per chemistry ----------------------------------------------------------------------------------
def test_model_option_default_and_per_chemistry_models():
    assert modelplan.parse_model_option([]) == (None, {})
    default, per = modelplan.parse_model_option(
        ["sup@v5.0.0", f"rna004_130bps={RNA_MODEL}", "flo-pro114m|sqk-nbd114-96|5000=/models/nbd_model"])
    assert default == "sup@v5.0.0"
    assert per == {"rna004_130bps": RNA_MODEL, NBD_KEY: "/models/nbd_model"}
    s = Settings("in", "out", model=DNA_MODEL, chemistry_models={"rna004_130bps": RNA_MODEL})
    assert modelplan.model_for(s, RNA_KEY) == RNA_MODEL
    assert modelplan.model_for(s, "FLO-MIN004RA|SQK-RNA004-XL|4000") == RNA_MODEL  # same chemistry, another key
    assert modelplan.model_for(s, NBD_KEY) == DNA_MODEL
    assert modelplan.model_for(s, None) == DNA_MODEL
    keyed = Settings("in", "out", chemistry_models={"rna004_130bps": RNA_MODEL, RNA_KEY: "rna004_130bps_hac@v5.1.0"})
    assert modelplan.model_for(keyed, RNA_KEY) == "rna004_130bps_hac@v5.1.0"  # the key's own entry wins
    for bad in (["hac", "sup"], ["rna004=x"], [f"rna004_130bps={RNA_MODEL}", "rna004_130bps=hac"], [""]):
        with pytest.raises(BadInput):
            modelplan.parse_model_option(bad)


def test_an_explicit_model_refuses_what_it_cannot_serve_a_variant_refuses_nothing():
    explicit = Settings("in", "out", model=DNA_MODEL)
    for key in (NBD_KEY, "FLO-FLG114HD|SQK-LSK114-XL|5000"):
        assert modelplan.refusal(explicit, key) is None
    rna = modelplan.refusal(explicit, RNA_KEY)
    assert DNA_MODEL in rna and "rna004_130bps" in rna and RNA_KEY in rna and "ledgerbc settings --set-model" in rna
    assert "4000 Hz" in modelplan.refusal(explicit, "FLO-PRO114M|SQK-LSK114|4000")  # 4 kHz DNA: the rate
    assert modelplan.refusal(explicit, "FLO-PRO002|SQK-RNA002|4000")  # an RNA kit, whatever dorado calls it
    assert modelplan.refusal(explicit, None)  # run info never read: cannot tell
    assert modelplan.refusal(explicit, f"{NBD_KEY};{RNA_KEY}")  # one read group is RNA
    both = Settings("in", "out", model=DNA_MODEL, chemistry_models={"rna004_130bps": RNA_MODEL})
    assert modelplan.refusal(both, RNA_KEY) is None
    assert "different models" in modelplan.refusal(both, f"{NBD_KEY};{RNA_KEY}")
    variant = Settings("in", "out", model="hac")
    assert all(modelplan.refusal(variant, k) is None for k in (RNA_KEY, "FLO-PRO002|SQK-LSK109|4000", None))


def test_init_refuses_a_model_dorado_refuses_or_one_given_to_a_chemistry_it_cannot_serve(tmp_path):
    (tmp_path / "in").mkdir()
    for models_, needle in ([["hac@v6"], "Version: 'v6.0.0' is not an available option"],
                            [["dna_r9.4.1_e8_hac@v3.3"], "Deprecated model"],
                            [[f"rna004_130bps={DNA_MODEL}"], "cannot basecall rna004_130bps"]):
        argv = ["init", tmp_path / "in", tmp_path / "out"] + [a for m in models_ for a in ("--model", m)]
        result = CliRunner().invoke(cli, [str(a) for a in argv], env={"PATH": "/usr/bin:/bin"})
        assert result.exit_code == 3 and needle in result.stderr, result.output
        assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()


# -- done when: 3 workers, real files plus two supported synthetic chemistries ------------------------------
@pytest.mark.slow
def test_three_workers_never_mix_chemistries_and_call_dorado_near_the_minimum(study: Study):
    # Two runs of supported chemistries (5 kHz DNA with a barcoding kit, RNA004) admitted first, then the
    # real ONT files (seven chemistries) arrive and a scan admits them: the real files make the run's tail.
    synthetic = {}
    for n, (name, key) in enumerate([("nbd", synth.DNA_5KHZ_NBD), ("rna", synth.RNA004)]):
        for i in range(40):
            rel = f"synthetic/{name}/{name}_{i:02d}.pod5"
            synthetic[rel] = synth.write_pod5(study.input / rel, 3, seed=100 * n + i, chemistry=key)
    batch_files = 8
    study.init("--batch-files", batch_files)
    copy_real_pod5(study.input / "real")
    study.cli("scan", "--ledger", study.ledger_path, check=True)
    workers = [study.start_worker(f"w{i}") for i in range(3)]
    codes = study.wait_workers(workers, timeout=300)
    assert codes == {f"w{i}": 0 for i in range(3)}, {w: study.worker_log(w)[-2000:] for w in codes}

    rows = files_by_rel(study.ledger)
    unsupported = {rel for rel in rows if not hac_would_run(study.input / rel)}
    dup = next(rel for rel, r in rows.items() if r.state == models.DUPLICATE)  # real: one file under two paths
    assert dup in unsupported and len(unsupported - {dup}) == 18 and all(rel.startswith("real/") for rel in unsupported)

    # No dorado call mixed chemistries: every call's batch holds one key, and dorado never said otherwise.
    calls = dorado_calls(study)
    assert not [line for lines in calls.values() for line in lines if "inhomogeneous" in line]
    assert all(sum("[ledgerbc] running:" in line for line in lines) == 1 for lines in calls.values())

    # Every supported file published exactly once (read ids in the outputs against the pod5 files).
    outputs = check_outputs(study)
    assert set(outputs.passed) == {rel for rel in rows if rel not in unsupported and rel != dup}
    for rel, ids in synthetic.items():
        assert {r.parent for r in outputs.records(rel)} == set(ids)

    # Every unsupported file failed after at most one call, its chemistry named in status --json.
    status = study.status()
    failed = {f["path"]: f for f in status["failed"]}
    assert set(failed) == unsupported - {dup} and status["files"]["failed"] == len(unsupported - {dup})
    for rel, f in failed.items():
        row = rows[rel]
        assert row.state == models.FAILED and row.attempts <= 1
        assert f["chemistry_key"] == row.chemistry and row.chemistry in f["error"]
        assert f["chemistry"] == chemistry.resolve(row.chemistry.split(";")[0]).name
        assert "dorado refused the chemistry" in f["error"]
    by_key = {c["key"]: c for c in status["chemistries"]}
    assert set(by_key) == {r.chemistry for r in rows.values()}
    assert by_key[NBD_KEY]["chemistry"] == "dna_r10.4.1_e8.2_400bps_5khz" and by_key[NBD_KEY]["supported"]
    assert by_key[RNA_KEY]["chemistry"] == "rna004_130bps" and by_key[RNA_KEY]["supported"]
    for key, c in by_key.items():
        mine = [r for r in rows.values() if r.chemistry == key]
        assert c["files"]["total"] == len(mine) and c["bytes"]["total"] == sum(r.size for r in mine)
        assert c["files"]["done"] == sum(r.state == models.DONE for r in mine)
        assert c["reads"]["out"] == sum((r.reads_pass or 0) + (r.reads_fail or 0) for r in mine)
        assert c["supported"] == chemistry.resolve(key).supported and c["model"] == "hac"
    assert {v["version"] for v in status["dorado"]["versions"]} == {"1.1.1+simulated"}
    assert status["dorado"]["study_version"] == "1.1.1+simulated"
    ran = {m["chemistry_key"]: m["model"] for m in status["dorado"]["models"]}
    assert ran[NBD_KEY] == "dna_r10.4.1_e8.2_400bps_hac@v5.2.0" and ran[RNA_KEY] == "rna004_130bps_hac@v5.2.0"

    # dorado calls per chemistry key, against the minimum ceil(files of the key / batch size). Batches
    # shrink only in the run's tail (the last 2 x workers x batch files, over all chemistries), so a key
    # claimed before it costs the minimum and one in it a few calls more.
    chem_of = batch_chemistry(study)
    per_key = Counter(chem_of[batch_id] for batch_id in calls)
    files_of = Counter(r.chemistry for r in rows.values() if r.state != models.DUPLICATE)
    excess = {}
    for key, n_calls in per_key.items():
        minimum = math.ceil(files_of[key] / batch_files)
        excess[key] = n_calls - minimum
        assert n_calls <= minimum + 2, f"{key}: {n_calls} dorado calls for {files_of[key]} files (minimum {minimum})"
    assert sum(excess.values()) <= 6, excess
    refused_keys = {rows[rel].chemistry for rel in unsupported}
    assert all(per_key[key] == 1 for key in refused_keys), "a refused chemistry was sent to dorado twice"

    # The text view groups the 18 failures by chemistry: one error line per chemistry, not per file.
    text = study.cli("status", "--ledger", study.ledger_path, check=True).stdout
    groups = [line for line in text.splitlines() if re.match(r"^  \S.*: \d+ files: ", line)]
    assert len(groups) == len({chemistry.resolve(rows[rel].chemistry).name for rel in unsupported - {dup}})
    assert "dna_r9.4.1_e8: 3 files: dorado refused it: The 'DNA r9.4.1 e8' chemistry has been deprecated" in text
    assert_work_tree_clean(study)


# -- done when: with an explicit DNA model, no RNA004 read is ever basecalled with it -----------------------
def _rna_files(rows) -> set[str]:
    """Files with an RNA read group (RNA004, RNA002, or an RNA kit dorado has no chemistry for)."""
    return {rel for rel, r in rows.items()
            if r.chemistry and any(chemistry.resolve(k).analyte == "rna" for k in r.chemistry.split(";"))}


def _read_ids(study: Study, rels) -> set[str]:
    return {i for rel in rels for i in pod5_read_ids(study.input / rel)}


def _all_output_read_ids(study: Study) -> set[str]:
    ids = set()
    for path in (study.output / "pass").rglob("*.fastq"):
        ids |= {r.read_id for r in read_fastq(path)} | {r.parent for r in read_fastq(path)}
    for path in (study.output / "fail").rglob("*.fastq"):
        ids |= {r.read_id for r in read_fastq(path)} | {r.parent for r in read_fastq(path)}
    return ids


@pytest.mark.slow
def test_an_explicit_dna_model_never_basecalls_an_rna_read(study: Study):
    copy_real_pod5(study.input / "real")
    for i in range(8):
        synth.write_pod5(study.input / f"synthetic/dna/d{i}.pod5", 3, seed=i)  # 5 kHz DNA, SQK-LSK114
    for i in range(6):
        synth.write_pod5(study.input / f"synthetic/rna_early/r{i}.pod5", 3, seed=50 + i, chemistry=synth.RNA004)
    # Admitted under a variant (every file pending), then the study switches to an explicit DNA model while
    # nothing is done yet: the pending RNA files were admitted before that model was known.
    study.init("--batch-files", 4)
    assert study.cli("settings", "--ledger", study.ledger_path, "--set-model", DNA_MODEL, check=True).stdout == f"model = {DNA_MODEL}\n"
    assert json.loads((study.output / "ledgerbc.settings.json").read_text())["model"] == DNA_MODEL
    # RNA files that arrive now are refused at admission, before any worker sees them.
    for i in range(6):
        synth.write_pod5(study.input / f"synthetic/rna_late/r{i}.pod5", 3, seed=80 + i, chemistry=synth.RNA004)
    study.cli("scan", "--ledger", study.ledger_path, check=True)
    late = files_by_rel(study.ledger)
    for i in range(6):
        row = late[f"synthetic/rna_late/r{i}.pod5"]
        assert row.state == models.FAILED and row.batch_id is None and row.attempts == 0
        assert DNA_MODEL in row.last_error and "rna004_130bps" in row.last_error

    workers = [study.start_worker(f"w{i}") for i in range(2)]
    assert study.wait_workers(workers, timeout=300) == {"w0": 0, "w1": 0}

    rows = files_by_rel(study.ledger)
    rna = _rna_files(rows)
    assert {rel for rel in rna if rel.startswith("synthetic/")} == {
        f"synthetic/rna_{when}/r{i}.pod5" for when in ("early", "late") for i in range(6)}
    assert {"real/rna004_130bps/rna004_130bps-FLO_PRO004RA-SQK_RNA004-4000.pod5",
            "real/poly_a/rna004_pod5/rna004_pt_50.pod5"} <= rna
    # No RNA read in any output, and no dorado call was ever made for an RNA file.
    assert not _read_ids(study, rna) & _all_output_read_ids(study)
    chem_of = batch_chemistry(study)
    called = {chem_of[batch_id] for batch_id in dorado_calls(study)}
    assert not called & {rows[rel].chemistry for rel in rna}
    for rel in rna:
        row = rows[rel]
        name = chemistry.resolve(row.chemistry).name
        assert row.state == models.FAILED and DNA_MODEL in row.last_error and name in row.last_error, rel
    # What the DNA model can serve (5 kHz DNA) is done, exactly once; everything else failed unsent.
    served = {rel for rel, r in rows.items()
              if r.state != models.DUPLICATE and modelplan.refusal(study.ledger.read_settings(), r.chemistry) is None}
    assert served and {rel for rel in served if rows[rel].state != models.DONE} == set()
    assert {rel for rel, r in rows.items() if r.state == models.DONE} == served
    check_outputs(study)
    assert set(called) == {rows[rel].chemistry for rel in served}
    status = study.status()
    rna_entry = next(c for c in status["chemistries"] if c["key"] == RNA_KEY)
    assert rna_entry["model"] == DNA_MODEL and DNA_MODEL in rna_entry["model_refusal"]
    assert rna_entry["files"]["failed"] == rna_entry["files"]["total"] == 13  # 12 synthetic, 1 real
    assert {m["model"] for m in status["dorado"]["models"]} == {DNA_MODEL}

    # The fix the error names: give RNA004 its own model, retry. RNA004 files are basecalled with it; files
    # no model of the study can serve fail again, still unsent.
    out = study.cli("settings", "--ledger", study.ledger_path, "--set-model", f"rna004_130bps={RNA_MODEL}", check=True).stdout
    assert out == f"model rna004_130bps = {RNA_MODEL}\n"
    study.cli("retry", "--ledger", study.ledger_path, "--all-failed", check=True)
    assert study.wait_workers([study.start_worker("w2")], timeout=300) == {"w2": 0}
    rows = files_by_rel(study.ledger)
    rna004 = {rel for rel in rna if chemistry.resolve(rows[rel].chemistry).name == "rna004_130bps"}
    assert len(rna004) == 14 and all(rows[rel].state == models.DONE for rel in rna004)
    assert all(rows[rel].state == models.FAILED for rel in rna - rna004)
    outputs = check_outputs(study)
    # dorado ran them with the RNA model (its name in every record's read group) and the ledger says so.
    assert {r.tags["RG"][2:].split("_", 1)[1] for rel in rna004 for r in outputs.records(rel)} == {RNA_MODEL}
    ran = {(m["chemistry_key"], m["model"]) for m in study.status()["dorado"]["models"]}
    assert {model for key, model in ran if chemistry.resolve(key).name == "rna004_130bps"} == {RNA_MODEL}
    assert {model for key, model in ran if chemistry.resolve(key).analyte == "dna"} == {DNA_MODEL}
    # One chemistry, one model: once RNA004 files are done with one model, another is refused.
    refused = study.cli("settings", "--ledger", study.ledger_path, "--set-model", "rna004_130bps=rna004_130bps_hac@v5.1.0",
                        check=False)
    assert refused.returncode == 3 and refused.stderr.count("Error: ") == 1
    assert RNA_MODEL in refused.stderr and "would mix models" in refused.stderr
    assert_work_tree_clean(study)


# -- provenance: one dorado version per study ---------------------------------------------------------------
def test_version_refusal_rules():
    assert provenance.version_refusal("1.1.1+abc", "1.1.1+abc", False) is None
    refused = provenance.version_refusal("1.1.1+abc", "1.3.0+def", False)
    assert "1.1.1+abc" in refused and "1.3.0+def" in refused and "ledgerbc settings --allow-dorado-upgrade" in refused
    assert provenance.version_refusal("1.1.1+abc", "1.1.1+dirty", False)  # another build of the same version
    assert provenance.version_refusal("1.1.1+abc", "1.3.0+def", True) is None
    assert provenance.version_refusal("1.1.1+abc", "1.1.1+dirty", True) is None
    assert "older" in provenance.version_refusal("1.1.1+abc", "1.0.0+old", True)
    assert "older" in provenance.version_refusal("1.10.0+a", "1.9.9+b", True)  # compared as numbers


def _refused_line(study: Study, worker_id: str) -> str:
    lines = [line for line in study.worker_log(worker_id).splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in study.worker_log(worker_id), study.worker_log(worker_id)
    return lines[0]


@pytest.mark.slow
def test_a_worker_with_another_dorado_refuses_to_claim_unless_the_study_allows_upgrades(study: Study):
    for i in range(8):
        synth.write_pod5(study.input / f"run/f{i}.pod5", 3, seed=i)
    study.init("--batch-files", 2)  # dorado (the stand-in, 1.1.1+simulated) is on PATH: init pins its version
    assert study.ledger.read_settings().dorado_version == "1.1.1+simulated"
    # `settings` alone shows them; a variable left in the shell changes nothing (command line only).
    risky = study.env(LEDGERBC_ALLOW_DORADO_UPGRADE="1", LEDGERBC_SET_MODEL=f"rna004_130bps={RNA_MODEL}")
    shown = study.cli("settings", "--ledger", study.ledger_path, env=risky, check=True).stdout.splitlines()
    assert 'dorado_version = "1.1.1+simulated"' in shown and "allow_dorado_upgrade = false" in shown
    assert not study.ledger.read_settings().allow_dorado_upgrade and not study.ledger.read_settings().chemistry_models
    # doctor, on a node whose dorado is another version, warns that workers there would refuse.
    doctor = study.cli("doctor", "--ledger", study.ledger_path, env=study.env(LEDGERBC_SIM_VERSION="1.3.0+0a1b2c3d"),
                       check=False).stdout
    assert "1.3.0+0a1b2c3d, but the study's is 1.1.1+simulated" in doctor

    newer = study.start_worker("newer", LEDGERBC_SIM_VERSION="1.3.0+0a1b2c3d")
    assert study.wait_workers([newer]) == {"newer": 13}
    line = _refused_line(study, "newer")
    assert "1.3.0+0a1b2c3d" in line and "1.1.1+simulated" in line and "ledgerbc settings --allow-dorado-upgrade" in line
    assert not query(study.ledger, models.Batch.__table__.select()), "a refused worker claimed a batch"
    assert [e.worker_id for e in events(study.ledger, "worker-refused")] == ["newer"]

    first = study.start_worker("pinned", "--max-batches", "1")
    assert study.wait_workers([first]) == {"pinned": 0}
    assert study.cli("settings", "--ledger", study.ledger_path, "--allow-dorado-upgrade", check=True).stdout == \
        "allow_dorado_upgrade = true\n"
    assert json.loads((study.output / "ledgerbc.settings.json").read_text())["allow_dorado_upgrade"] is True
    older = study.start_worker("older", LEDGERBC_SIM_VERSION="1.0.0+01d")
    assert study.wait_workers([older]) == {"older": 13}
    assert "older than the study's 1.1.1+simulated" in _refused_line(study, "older")
    upgraded = study.start_worker("upgraded", LEDGERBC_SIM_VERSION="1.3.0+0a1b2c3d")
    assert study.wait_workers([upgraded]) == {"upgraded": 0}

    check_outputs(study)
    batches = query(study.ledger, models.Batch.__table__.select())
    assert {(b.worker_id, b.dorado_version) for b in batches} == {
        ("pinned", "1.1.1+simulated"), ("upgraded", "1.3.0+0a1b2c3d")}  # from each batch's BAM (@PG VN)
    status = study.status()
    assert status["dorado"]["study_version"] == "1.1.1+simulated" and status["dorado"]["allow_upgrade"] is True
    versions = {v["version"]: v for v in status["dorado"]["versions"]}
    assert set(versions) == {"1.1.1+simulated", "1.3.0+0a1b2c3d"}
    assert versions["1.1.1+simulated"]["batches"] == 1 and versions["1.3.0+0a1b2c3d"]["batches"] == len(batches) - 1
    assert {w["worker_id"]: w["dorado_version"] for w in status["workers"]} == {
        "pinned": "1.1.1+simulated", "upgraded": "1.3.0+0a1b2c3d"}
    text = study.cli("status", "--ledger", study.ledger_path, check=True).stdout
    assert "in use: 1.1.1+simulated (0 workers running, 1 batches), 1.3.0+0a1b2c3d" in text
    # And back: with upgrades forbidden again, the newer dorado is refused.
    study.cli("settings", "--ledger", study.ledger_path, "--forbid-dorado-upgrade", check=True)
    again = study.start_worker("again", LEDGERBC_SIM_VERSION="1.3.0+0a1b2c3d")
    assert study.wait_workers([again]) == {"again": 13}


@pytest.mark.slow
def test_without_dorado_at_init_the_first_worker_pins_the_version_atomically(study: Study):
    for i in range(4):
        synth.write_pod5(study.input / f"run/f{i}.pod5", 3, seed=i)
    no_dorado = {k: v for k, v in study.env().items() if k != "PATH"}
    no_dorado["PATH"] = "/usr/bin:/bin"
    study.cli("init", study.input, study.output, "--batch-files", 1, "--lease", "20s", "--heartbeat", "1s",
              env=no_dorado, check=True)
    assert study.ledger.read_settings().dorado_version is None
    # Two first workers at once, with different dorado versions: one pins, the other is held to it.
    a = study.start_worker("a", LEDGERBC_SIM_VERSION="1.2.0+aaaaaaa")
    b = study.start_worker("b", LEDGERBC_SIM_VERSION="1.4.0+bbbbbbb")
    codes = study.wait_workers([a, b])
    assert sorted(codes.values()) == [0, 13], codes
    winner = next(w for w, code in codes.items() if code == 0)
    pinned = {"a": "1.2.0+aaaaaaa", "b": "1.4.0+bbbbbbb"}[winner]
    assert study.ledger.read_settings().dorado_version == pinned
    assert json.loads((study.output / "ledgerbc.settings.json").read_text())["dorado_version"] == pinned  # for a rebuild
    assert [e.worker_id for e in events(study.ledger, "dorado-pinned")] == [winner]
    check_outputs(study)
    assert {b.dorado_version for b in query(study.ledger, models.Batch.__table__.select())} == {pinned}
