"""synth.py: datasets written with pod5.Writer read back with pod5.Reader."""
import pod5
import pytest

from ledgerbc.testkit.synth import HOSTILE_NAMES, SPLIT_READ_SAMPLES, make_dataset, truncate_copy, write_pod5


def read_back(path):
    with pod5.Reader(path) as reader:
        return [(str(read.read_id), read.num_samples) for read in reader.reads()]


def test_write_pod5_returns_the_read_ids_in_the_file(tmp_path):
    ids = write_pod5(tmp_path / "a.pod5", 7, (100, 200), seed=3)
    back = read_back(tmp_path / "a.pod5")
    assert [read_id for read_id, _ in back] == ids and len(set(ids)) == 7
    assert all(100 <= n <= 200 for _, n in back)
    assert write_pod5(tmp_path / "b.pod5", 7, (100, 200), seed=3) == ids  # deterministic
    write_pod5(tmp_path / "c.pod5", 2, 500)
    assert [n for _, n in read_back(tmp_path / "c.pod5")] == [500, 500]


def test_make_dataset_reads_back_exactly_and_has_hostile_names(tmp_path):
    dataset = make_dataset(tmp_path, 60, seed=1)
    on_disk = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pod5")}
    assert on_disk == set(dataset) and len(dataset) == 60
    all_ids = []
    for rel, ids in dataset.items():
        back = read_back(tmp_path / rel)
        assert [read_id for read_id, _ in back] == ids and 1 <= len(ids) <= 31
        all_ids += ids
    assert len(all_ids) == len(set(all_ids))  # read ids are unique across the dataset

    assert set(HOSTILE_NAMES) <= set(dataset)
    names = " ".join(dataset)
    for piece in (" ", "échantillon", "読み", "'", '"', ";", "$(touch pwned)", "`"):
        assert piece in names
    assert any(rel.split("/")[-1].startswith("-") for rel in dataset)
    basenames = [rel.split("/")[-1] for rel in dataset]
    assert any(basenames.count(b) > 1 for b in basenames)
    assert len({rel.count("/") for rel in dataset}) >= 3  # several folder depths
    sizes = {(tmp_path / rel).stat().st_size for rel in dataset}
    assert max(sizes) > 10 * min(sizes)
    # one file in 50 carries a read the stand-in dorado splits
    assert any(n == SPLIT_READ_SAMPLES for _, n in read_back(tmp_path / list(dataset)[49]))


def test_make_dataset_plain(tmp_path):
    dataset = make_dataset(tmp_path, 5, seed=2, hostile_names=False, size_spread=False)
    assert not set(HOSTILE_NAMES) & set(dataset)
    assert all(len(ids) == 10 for ids in dataset.values())
    assert all(name.isascii() and " " not in name for name in dataset)


def test_truncate_copy_is_unreadable(tmp_path):
    write_pod5(tmp_path / "whole.pod5", 5, 4000, seed=0)
    cut = truncate_copy(tmp_path / "whole.pod5", tmp_path / "cut.pod5", keep_fraction=0.5)
    assert cut.stat().st_size == (tmp_path / "whole.pod5").stat().st_size // 2
    with pytest.raises(Exception):
        read_back(cut)
