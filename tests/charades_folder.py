"""A small Charades-STA folder with action timelines (``Charades_v1_*.csv``), written for the tests of
the action traces and of the action diagnosis."""

from __future__ import annotations

from pathlib import Path

HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\r\n"
TRAIN_ROWS = {
    "VIDA1": ("c001 0.00 10.00;c002 12.00 20.00;c003 2.00 6.00", 30.0),
    "VIDA2": ("c001 5.00 9.00;c004 10.00 25.00", 28.0),
    "VIDA3": ("c002 1.00 9.00;c004 12.00 14.00", 20.0),
}
TEST_ROWS = {"VIDB1": ("c002 3.00 11.00;c001 15.00 29.50", 29.0), "VIDB2": ("c004 0.0 8.0;c001 9 19", 19.0)}
TRAIN_QUERIES = [
    "VIDA1 12.0 20.0##person opens a door.",
    "VIDA1 0.0 10.0##a person holds a cup.",
    "VIDA2 10.0 25.0##person is sitting.",
    "VIDA3 1.0 9.0##person opens the door.",
]
TEST_QUERIES = [
    "VIDB1 3.0 11.0##person opens a door.",
    "VIDB1 15.0 29.0##person holds a cup.",
    "VIDB2 0.0 8.0##sits.",
    "VIDB2 9.0 19.0##a person holds a cup.",
]


def csv_text(rows: dict[str, tuple[str, float]]) -> str:
    return HEADER + "".join(
        f'{v},S,Kitchen,6,7,Yes,"a, script",x,y,{a},{n}\r\n' for v, (a, n) in rows.items()
    )


def write_charades(folder: Path) -> Path:
    """A two-split Charades-STA folder: 3 train videos, 2 test videos, with action timelines."""
    (folder / "Charades_v1_train.csv").write_bytes(csv_text(TRAIN_ROWS).encode())
    (folder / "Charades_v1_test.csv").write_bytes(csv_text(TEST_ROWS).encode())
    (folder / "charades_sta_train.txt").write_text("\n".join(TRAIN_QUERIES) + "\n")
    (folder / "charades_sta_test.txt").write_text("\n".join(TEST_QUERIES) + "\n")
    return folder
