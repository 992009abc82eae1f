"""ledgerbc: basecall a nanopore study across a Slurm array, coordinated by one SQLite ledger."""
import re
from pathlib import Path

from setuptools import find_packages, setup

# One version: ledgerbc.__version__ (what `ledgerbc --version` and the benchmarks print), read, not imported.
VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("ledgerbc").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

setup(
    name="ledgerbc",
    version=VERSION,
    description="Serverless, exactly-once dorado basecalling across Slurm array tasks via a SQLite ledger",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ledgerbc", "ledgerbc.*"]),
    include_package_data=True,
    package_data={
        "ledgerbc": ["slurm_array.sh", "slurm_finalize.sh", "alembic.ini"],
        "ledgerbc.migrations": ["script.py.mako", "versions/*.py"],
    },
    install_requires=[
        "sqlalchemy>=2.0,<3",
        "alembic>=1.12,<2",
        "filelock>=3.12,<5",
        "click>=8.1,<9",
        "pod5>=0.3.10,<0.4",
        "pysam>=0.22,<0.26",
        "numpy>=1.24,<3",  # split.py (qscores) and the synthetic pod5 writer import it
        "isal>=1.6,<2",  # ISA-L deflate for fastq.gz and BAM outputs (writers.py falls back to zlib)
        "matplotlib>=3.7,<4",  # the run report's figures, as inline SVG (imported only by report.py)
    ],
    # test-only: playwright drives Debian's chromium (never a browser of its own; see tests/clients.py).
    # pycoQC and NanoPlot are test-only too, each in its own venv (ci/qc/*.txt), never dependencies here.
    extras_require={"test": ["pytest>=7.4,<10", "pytest-timeout>=2.1,<3", "playwright>=1.50,<2"]},
    entry_points={
        "console_scripts": [
            "ledgerbc=ledgerbc.cli:main",
            "ledgerbc-simulated-dorado=ledgerbc.testkit.dorado:main",
        ]
    },
)
