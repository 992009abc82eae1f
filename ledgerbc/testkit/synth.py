"""Synthetic pod5 datasets written with the real `pod5.Writer` (demo, tests, benchmarks).

The signal is noise: only the file structure, read ids and sample counts matter to ledgerbc.
"""
from __future__ import annotations

import datetime
import os
import uuid
from pathlib import Path

import numpy as np
import pod5

# Names that break anything that builds a shell string, splits on spaces or assumes ASCII.
HOSTILE_NAMES = [
    "with space/run 01 sample.pod5",
    "échantillon/読み.pod5",
    "quotes/it's.pod5",
    'quotes/say "hi".pod5',
    "semi;colon.pod5",
    "$(touch pwned).pod5",
    "-leading-dash.pod5",
    "tick/`touch pwned`.pod5",
    "dup_a/reads.pod5",
    "dup_b/reads.pod5",
]

# Above the stand-in dorado's default split threshold (LEDGERBC_SIM_SPLIT_SAMPLES=300000).
SPLIT_READ_SAMPLES = 320_000

_EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
# One block of noise sliced per read: generating fresh noise for every read is the slow part.
_NOISE = np.random.default_rng(12345).normal(500, 60, 2 * SPLIT_READ_SAMPLES).astype(np.int16)


# Run info keys (flow cell product code, sequencing kit, sample rate) of chemistries dorado >= 1.0 supports
# (ledgerbc.chemistry.resolve): the default, another kit of the same chemistry, and RNA004.
DNA_5KHZ = ("FLO-PRO114M", "SQK-LSK114", 5000)
DNA_5KHZ_NBD = ("FLO-PRO114M", "SQK-NBD114-96", 5000)
RNA004 = ("FLO-PRO004RA", "SQK-RNA004", 4000)
# ...and ones it refuses: 4 kHz R10.4.1, R9.4.1, RNA002.
DNA_4KHZ = ("FLO-PRO114M", "SQK-LSK114", 4000)
DNA_R941 = ("FLO-PRO002", "SQK-LSK109", 4000)
RNA002 = ("FLO-MIN106", "SQK-RNA002", 3000)


def _chemistry(chemistry) -> tuple[str, str, int]:
    """(flow cell product code, kit, sample rate) from a tuple or a ledgerbc.chemistry.RunInfoKey."""
    if chemistry is None:
        return DNA_5KHZ
    if hasattr(chemistry, "flow_cell_product_code"):
        return chemistry.flow_cell_product_code, chemistry.sequencing_kit, int(chemistry.sample_rate)
    flow_cell, kit, rate = chemistry
    return flow_cell, kit, int(rate)


def _run_info(rng: np.random.Generator, chemistry=None) -> pod5.RunInfo:
    flow_cell, kit, rate = _chemistry(chemistry)
    acquisition_id = uuid.UUID(bytes=rng.bytes(16), version=4).hex
    return pod5.RunInfo(
        acquisition_id=acquisition_id,
        acquisition_start_time=_EPOCH,
        adc_max=4095,
        adc_min=-4096,
        context_tags={"sample_frequency": str(rate), "sequencing_kit": kit.lower()},
        experiment_name="ledgerbc-synthetic",
        flow_cell_id="PAS00000",
        flow_cell_product_code=flow_cell,
        protocol_name=f"sequencing/sequencing_PRO114_DNA_e8_2_400K:{flow_cell}:{kit}",
        protocol_run_id=str(uuid.UUID(bytes=rng.bytes(16), version=4)),
        protocol_start_time=_EPOCH,
        sample_id="synthetic",
        sample_rate=rate,
        sequencing_kit=kit,
        sequencer_position="1A",
        sequencer_position_type="PromethION",
        software="ledgerbc.synth",
        system_name="synthetic",
        system_type="PromethION 24",
        tracking_id={"run_id": acquisition_id},
    )


def write_pod5(path, n_reads: int, samples_per_read=(2000, 20000), seed: int = 0, chemistry=None) -> list[str]:
    """Write a pod5 file of `n_reads` reads and return their read ids (as strings, in file order).

    `samples_per_read` is a sample count or an inclusive `(min, max)` range; everything is
    deterministic in `seed` except the file_identifier, which pod5 draws itself. `chemistry` is the run
    info's (flow cell product code, sequencing kit, sample rate), default `DNA_5KHZ`.
    """
    if isinstance(samples_per_read, int):
        low = high = samples_per_read
    else:
        low, high = samples_per_read
    if not 1 <= low <= high <= len(_NOISE):
        raise ValueError(f"samples_per_read must lie in 1..{len(_NOISE)}: {samples_per_read!r}")
    rng = np.random.default_rng(seed)
    return _write(path, [int(n) for n in rng.integers(low, high + 1, n_reads)], rng, chemistry)


def _write(path, sample_counts: list[int], rng: np.random.Generator, chemistry=None) -> list[str]:
    run_info = _run_info(rng, chemistry)
    end_reason = pod5.EndReason.from_reason_with_default_forced(pod5.EndReasonEnum.SIGNAL_POSITIVE)
    reads = []
    for number, n_samples in enumerate(sample_counts):
        offset = int(rng.integers(0, len(_NOISE) - n_samples + 1))
        reads.append(
            pod5.Read(
                read_id=uuid.UUID(bytes=rng.bytes(16), version=4),
                pore=pod5.Pore(channel=int(rng.integers(1, 3001)), well=1, pore_type="not_set"),
                calibration=pod5.Calibration(offset=-250.0, scale=0.17),
                read_number=number + 1,
                start_sample=number * 400_000,
                median_before=200.0,
                end_reason=end_reason,
                run_info=run_info,
                signal=_NOISE[offset : offset + n_samples],
            )
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with pod5.Writer(path, software_name="ledgerbc.synth") as writer:
        writer.add_reads(reads)
    return [str(read.read_id) for read in reads]


def _plain_name(index: int, seed: int) -> str:
    depth = index % 4
    folders = [f"run{index % 3}", "pod5_pass", f"barcode{index % 5:02d}"][:depth]
    return "/".join(folders + [f"PAS00000_pass_{seed:x}_{index:05d}.pod5"])


def make_dataset(root, n_files: int, seed: int = 0, hostile_names: bool = True,
                 size_spread: bool = True, chemistry=None) -> dict[str, list[str]]:
    """Write `n_files` pod5 files under `root` (nested folders); return {rel path: read ids}.

    With `hostile_names`, the first files get names with spaces, unicode, quotes, `;`, `$(...)`,
    backticks, a leading `-` and a basename shared by two folders. With `size_spread`, files hold
    1-30 reads of 1000 to 60000 samples, and one file in 50 also holds a read long enough for
    the stand-in dorado to split; otherwise every file holds 10 reads of 4000-8000 samples. Every file
    has the run info key `chemistry` (default `DNA_5KHZ`).
    """
    root = Path(root)
    names = HOSTILE_NAMES[:n_files] if hostile_names else []
    names += [_plain_name(i, seed) for i in range(len(names), n_files)]
    rng = np.random.default_rng(seed)
    dataset: dict[str, list[str]] = {}
    for index, rel in enumerate(names):
        file_rng = np.random.default_rng(int(rng.integers(0, 2**63)))
        if size_spread:
            longest = int(file_rng.choice([4000, 20000, 60000]))
            counts = [int(n) for n in file_rng.integers(1000, longest + 1, int(file_rng.integers(1, 31)))]
            if index % 50 == 49:
                counts.append(SPLIT_READ_SAMPLES)
        else:
            counts = [int(n) for n in file_rng.integers(4000, 8001, 10)]
        dataset[rel] = _write(root / rel, counts, file_rng, chemistry)
    return dataset


def truncate_copy(src, dst, keep_fraction: float = 0.5) -> Path:
    """Copy the first `keep_fraction` of `src` to `dst`: a pod5 cut short, as by a failed copy."""
    remaining = int(os.path.getsize(src) * keep_fraction)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while remaining > 0:
            chunk = fin.read(min(remaining, 1 << 20))
            if not chunk:
                break
            fout.write(chunk)
            remaining -= len(chunk)
    return Path(dst)
