"""Submission validator (`ensemble.py check`), writer and the zip (the readers: test_tables.py)."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cxrlt.core.cli import main_wrapper
from cxrlt.core.errors import InputError
from cxrlt.core.labels import CXRLT2026_LABELS
from cxrlt.evaluation.submission import validate_submission, write_zip
from cxrlt.data.tables import read_id_list

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Normal", "Mass", "Hernia"]
IDS = ["a.png", "b.png", "c.png", "d.png"]


def write_test_list(path, ids=IDS, trailing=30):
    """Official layout: 3 ID columns, then `trailing` empty columns on every row."""
    tail = "," * trailing
    rows = [f"ImageID,StudyDate_DICOM,PatientID{tail}"]
    rows += [f"{i},20170101,1.23E+38{tail}" for i in ids]
    Path(path).write_text("\n".join(rows) + "\n")
    return path


def good_rows(labels=LABELS, ids=IDS):
    rng = np.random.default_rng(1)
    return [["ImageID"] + list(labels)] + [[i] + [f"{v:.4f}" for v in rng.random(len(labels))] for i in ids]


def write_rows(path, rows):
    Path(path).write_text("\n".join(",".join(r) for r in rows) + "\n")
    return path


@pytest.fixture
def files(tmp_path):
    return write_test_list(tmp_path / "list.csv"), tmp_path / "sub.csv"


def test_valid_submission_passes(files):
    lst, sub = files
    write_rows(sub, good_rows())
    df = validate_submission(sub, lst, LABELS)
    assert list(df.index) == IDS and list(df.columns) == LABELS
    assert read_id_list(lst)["ImageID"].tolist() == IDS  # trailing empty columns tolerated


def _set(rows, r, c, v):
    rows = [list(x) for x in rows]
    rows[r][c] = v
    return rows


# (name, edit of the good rows, text the message must contain: row and column where there is one)
CASES = [
    ("nan", lambda r: _set(r, 2, 2, "nan"), "row 3, column 3 ('Mass'): NaN"),
    ("inf", lambda r: _set(r, 4, 1, "inf"), "row 5, column 2 ('Normal'): infinite"),
    ("negative", lambda r: _set(r, 1, 3, "-0.1"), "row 2, column 4 ('Hernia'): value -0.1 outside [0, 1]"),
    ("above one", lambda r: _set(r, 3, 1, "1.2"), "row 4, column 2 ('Normal'): value 1.2 outside"),
    ("blank cell", lambda r: _set(r, 2, 3, ""), "row 3, column 4 ('Hernia'): blank cell"),
    ("text", lambda r: _set(r, 2, 1, "high"), "row 3, column 2 ('Normal'): not a number"),
    ("missing row", lambda r: r[:-1], "1 ImageID(s) of"),
    ("extra row", lambda r: r + [["e.png", "0.1", "0.2", "0.3"]], "row 6, column 1 ('ImageID'): ImageID 'e.png' is not in"),
    ("duplicated row", lambda r: r[:3] + [r[2]] + r[3:4], "row 4, column 1 ('ImageID'): duplicate ImageID 'b.png' (first at row 3)"),
    ("column order swapped", lambda r: [[x[0], x[2], x[1], x[3]] for x in r], "row 1, column 2: expected 'Normal', found 'Mass'"),
    ("wrong header", lambda r: _set(r, 0, 3, "hernia"), "row 1, column 4 ('hernia'): header does not match"),
    ("missing column", lambda r: [x[:3] for x in r], "missing ['Hernia']"),
    ("id header", lambda r: _set(r, 0, 0, "image_id"), "row 1, column 1: expected 'ImageID'"),
    ("id with a leading space", lambda r: _set(r, 2, 0, " " + r[2][0]),
     "row 3, column 1 ('ImageID'): ImageID ' b.png' has surrounding spaces"),
]


@pytest.mark.parametrize("name,edit,expected", CASES, ids=[c[0] for c in CASES])
def test_validator_rejects(files, name, edit, expected):
    lst, sub = files
    write_rows(sub, edit(good_rows()))
    with pytest.raises(InputError) as e:
        validate_submission(sub, lst, LABELS)
    assert expected in str(e.value)
    assert str(sub) in str(e.value)


def test_first_problem_in_file_order_is_reported(files):
    lst, sub = files
    rows = _set(_set(good_rows(), 4, 1, "nan"), 2, 3, "2")
    write_rows(sub, rows)
    with pytest.raises(InputError, match=r"row 3, column 4"):
        validate_submission(sub, lst, LABELS)


def run_check(*args):
    return subprocess.run([sys.executable, str(REPO / "ensemble.py"), "check", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def test_check_cli_default_labels_ok_and_bad(tmp_path):
    lst = write_test_list(tmp_path / "list.csv")
    sub = write_rows(tmp_path / "sub.csv", good_rows(CXRLT2026_LABELS))
    r = run_check(sub, "--test-list", lst)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"OK: 4 rows x {len(CXRLT2026_LABELS)} labels"
    write_rows(sub, _set(good_rows(CXRLT2026_LABELS), 2, 5, "1.5"))
    r = run_check(sub, "--test-list", lst)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "row 3, column 6" in r.stderr


def check_inprocess(capsys, *args):
    """`ensemble.py check` in this process (no interpreter start-up); returns (code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("ensemble_cli", REPO / "ensemble.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        main_wrapper(lambda: mod.main(["check", *map(str, args)]))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_check_cli_labels_file_and_labels_from(tmp_path, capsys):
    lst = write_test_list(tmp_path / "list.csv")
    sub = write_rows(tmp_path / "sub.csv", good_rows())
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    assert check_inprocess(capsys, sub, "--test-list", lst, "--labels-file", tmp_path / "labels.txt")[0] == 0
    train = tmp_path / "train.csv"
    train.write_text("ImageID,StudyDate_DICOM,PatientID,Normal,Mass,Hernia\nx.png,1,2,0,1,0\n")
    code, out, _ = check_inprocess(capsys, sub, "--test-list", lst, "--labels-from", train)
    assert code == 0 and out == "OK: 4 rows x 3 labels\n"
    train.write_text("ImageID,StudyDate_DICOM,PatientID,Mass,Normal,Hernia\nx.png,1,2,0,1,0\n")
    code, _, err = check_inprocess(capsys, sub, "--test-list", lst, "--labels-from", train)
    assert code == 2 and "wrong column order" in err


def test_zip_has_csv_at_top_and_code(tmp_path):
    sub = write_rows(tmp_path / "sub.csv", good_rows())
    z = tmp_path / "sub.zip"
    n = write_zip(sub, z, REPO)
    names = zipfile.ZipFile(z).namelist()
    assert len(names) == n
    assert "sub.csv" in names
    assert "code/Makefile" in names and "code/cxrlt/core/labels.py" in names  # git-tracked
    assert not any(x.startswith("code/.venv/") or x.startswith("code/data/cache") for x in names)


def test_zip_without_git_walks_tree(tmp_path):
    root = tmp_path / "proj"
    (root / "cxrlt").mkdir(parents=True)
    (root / "cxrlt" / "m.py").write_text("x = 1\n")
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "big.py").write_text("")
    (root / "runs").mkdir()
    (root / "runs" / "model.pt").write_text("")
    sub = write_rows(tmp_path / "sub.csv", good_rows())
    write_zip(sub, tmp_path / "s.zip", root)
    assert sorted(zipfile.ZipFile(tmp_path / "s.zip").namelist()) == ["code/cxrlt/m.py", "sub.csv"]
