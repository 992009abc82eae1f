"""A stand-in sequencer for the follow-mode tests, run as its own process:

    python live_writer.py INPUT_DIR RUN_DIR N_FILES LOG

writes N_FILES pod5 files into INPUT_DIR with `pod5.Writer`, a few reads at a time, several files open at
once (so each file exists, with the writer's hidden `.<id>.tmp-*` files beside it, for a couple of seconds
before it is complete), then writes RUN_DIR/final_summary_<...>.txt as MinKNOW does at the end of a run.
LOG gets one JSON line per closed file: {"rel", "closed_at" (epoch seconds, after close returned),
"reads"} and a last line {"final_summary", "written_at"}.
"""
from __future__ import annotations

import datetime
import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pod5

from ledgerbc.testkit.synth import SPLIT_READ_SAMPLES

NEW_FILE_EVERY = 0.9  # seconds between two files opened
READ_EVERY = 0.3  # seconds between two reads added to an open file
READS_PER_FILE = 7  # so a file stays open ~2 s and 2-3 files are in flight
_NOISE = np.random.default_rng(7).normal(500, 60, 2 * SPLIT_READ_SAMPLES).astype(np.int16)


def run_info() -> pod5.RunInfo:
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    return pod5.RunInfo(
        acquisition_id="a" * 40, acquisition_start_time=start, adc_max=4095, adc_min=-4096,
        context_tags={"sample_frequency": "5000"}, experiment_name="live", flow_cell_id="PAW00000",
        flow_cell_product_code="FLO-PRO114M", protocol_name="sequencing", protocol_run_id="live-run",
        protocol_start_time=start, sample_id="live", sample_rate=5000, sequencing_kit="sqk-lsk114",
        sequencer_position="1A", sequencer_position_type="PromethION", software="live_writer",
        system_name="live", system_type="PromethION 24", tracking_id={"run_id": "live"},
    )


class OpenFile:
    def __init__(self, root: Path, i: int, rng: np.random.Generator):
        folder = "" if i % 3 else "barcode01/"  # MinKNOW writes flat or per barcode
        self.rel = f"{folder}PAW00000_pass_live_{i:03d}.pod5"
        (root / self.rel).parent.mkdir(parents=True, exist_ok=True)
        self.writer = pod5.Writer(root / self.rel, software_name="live_writer")
        self.rng = rng
        self.info = run_info()
        self.added = 0
        # every 20th file carries one read long enough for the stand-in dorado to split (pi:Z in the output)
        self.sizes = [int(n) for n in rng.integers(2000, 9000, READS_PER_FILE)]
        if i % 20 == 7:
            self.sizes[3] = SPLIT_READ_SAMPLES
        self.next_read = time.monotonic()

    def add_read(self) -> None:
        n = self.sizes[self.added]
        offset = int(self.rng.integers(0, len(_NOISE) - n + 1))
        self.writer.add_read(pod5.Read(
            read_id=uuid.UUID(bytes=self.rng.bytes(16), version=4),
            pore=pod5.Pore(channel=int(self.rng.integers(1, 3001)), well=1, pore_type="not_set"),
            calibration=pod5.Calibration(offset=-250.0, scale=0.17), read_number=self.added + 1,
            start_sample=self.added * 400_000, median_before=200.0,
            end_reason=pod5.EndReason.from_reason_with_default_forced(pod5.EndReasonEnum.SIGNAL_POSITIVE),
            run_info=self.info, signal=_NOISE[offset : offset + n],
        ))
        self.added += 1
        self.next_read = time.monotonic() + READ_EVERY

    @property
    def full(self) -> bool:
        return self.added == len(self.sizes)


def main(input_dir: str, run_dir: str, n_files: int, log_path: str) -> None:
    root = Path(input_dir)
    rng = np.random.default_rng(2024)
    opened, open_files = 0, []
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        while opened < n_files or open_files:
            now = time.monotonic()
            if opened < n_files and now >= start + opened * NEW_FILE_EVERY:
                open_files.append(OpenFile(root, opened, rng))
                opened += 1
            for f in list(open_files):
                if f.full:
                    f.writer.close()
                    log.write(json.dumps({"rel": f.rel, "closed_at": time.time(), "reads": f.added}) + "\n")
                    log.flush()
                    open_files.remove(f)
                elif now >= f.next_read:
                    f.add_read()
            time.sleep(0.02)
        summary = Path(run_dir) / "final_summary_PAW00000_live_0a1b2c3d.txt"
        summary.write_text(
            "instrument=PC24B000\nposition=1A\nflow_cell_id=PAW00000\nsample_id=live\n"
            "protocol=sequencing/sequencing_PRO114_DNA_e8_2_400K:FLO-PRO114M:SQK-LSK114\n"
            f"started=2024-01-01T00:00:00Z\nacquisition_stopped=2024-01-01T01:00:00Z\n"
            f"fast5_files_in_final_dest=0\nfast5_files_in_fallback=0\n"
            f"pod5_files_in_final_dest={n_files}\npod5_files_in_fallback=0\n"
            "fastq_files_in_final_dest=0\nfastq_files_in_fallback=0\n",
            encoding="utf-8",
        )
        log.write(json.dumps({"final_summary": str(summary), "written_at": time.time()}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
