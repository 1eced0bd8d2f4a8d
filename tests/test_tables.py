"""Reading and validating the challenge tables (cxrlt.data.tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlt.data.tables import read_id_list, read_label_table, read_predictions, read_training_csv
from cxrlt.core.errors import InputError

HEADER = "ImageID,StudyDate_DICOM,PatientID,Normal,Mass,Hernia\n"
GOOD = HEADER + (
    "a_1.png,20161010,1.90E+38,1,0,0\n"
    "b_2.png,20170327,3.09E+38,0,1,0\n"
    "c_3.png,20150101,0123,0,0,1\n"
)


def write(tmp_path, text: str, name: str = "train.csv", encoding: str = "utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def test_training_csv_keeps_ids_as_strings_and_labels_as_int(tmp_path):
    df, labels = read_training_csv(write(tmp_path, GOOD))
    assert labels == ["Normal", "Mass", "Hernia"]
    assert list(df.columns) == ["ImageID", "StudyDate_DICOM", "PatientID", "Normal", "Mass", "Hernia"]
    assert df["PatientID"].tolist() == ["1.90E+38", "3.09E+38", "0123"]  # no float, no lost zero
    assert df["StudyDate_DICOM"].tolist() == ["20161010", "20170327", "20150101"]
    assert all(isinstance(v, str) for v in df["PatientID"])
    assert all(df[c].dtype == np.int8 for c in labels)
    assert df[labels].to_numpy().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert df.index.tolist() == [2, 3, 4]  # spreadsheet row numbers


def test_bom_and_crlf_give_the_same_table(tmp_path):
    plain, labels = read_training_csv(write(tmp_path, GOOD, "plain.csv"))
    odd, labels2 = read_training_csv(write(tmp_path, "\ufeff" + GOOD.replace("\n", "\r\n"), "odd.csv"))
    assert labels2 == labels
    pd.testing.assert_frame_equal(plain, odd)


def test_blank_lines_are_skipped_and_rows_keep_file_numbers(tmp_path):
    text = HEADER + "a.png,1,1,1,0,0\n\nb.png,1,1,0,2,0\n"
    with pytest.raises(InputError, match=r"row 4, column 'Mass': '2'"):
        read_training_csv(write(tmp_path, text))


def test_labels_file_selects_and_orders_columns(tmp_path):
    lf = write(tmp_path, "Hernia\nNormal\n", "labels.txt")
    df, labels = read_training_csv(write(tmp_path, GOOD), labels_file=lf)
    assert labels == ["Hernia", "Normal"]
    assert list(df.columns)[3:] == ["Hernia", "Normal"]
    assert df["Hernia"].tolist() == [0, 0, 1]


def test_label_missing_versus_labels_file(tmp_path):
    lf = write(tmp_path, "Normal\nPneumothorax\n", "labels.txt")
    with pytest.raises(InputError, match=r"train\.csv.*missing label column 'Pneumothorax'.*labels\.txt"):
        read_training_csv(write(tmp_path, GOOD), labels_file=lf)


def test_nih_style_14_labels(tmp_path):
    nih = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
           "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (6, 14))
    lines = ["ImageID,StudyDate_DICOM,PatientID," + ",".join(nih)]
    lines += [f"0000{i}_000.png,,{i}," + ",".join(map(str, row)) for i, row in enumerate(y)]
    df, labels = read_training_csv(write(tmp_path, "\n".join(lines) + "\n"))
    assert labels == nih
    assert (df[nih].to_numpy() == y).all()
    assert df["StudyDate_DICOM"].tolist() == [""] * 6


@pytest.mark.parametrize("text, pattern", [
    ("", r"file is empty"),
    (HEADER, r"no data rows"),
    ("ImageID,PatientID,Normal\na.png,1,0\n", r"row 1.*missing column 'StudyDate_DICOM'"),
    ("ImageId,StudyDate_DICOM,PatientID,Normal\na.png,1,1,0\n", r"missing column 'ImageID'; found 'ImageId'"),
    ("ImageID,StudyDate_DICM,PatientID,Normal\na.png,1,1,0\n",
     r"missing column 'StudyDate_DICOM'; did you mean 'StudyDate_DICM'"),
    ("ImageID,StudyDate_DICOM,PatientID\na.png,1,1\n", r"no label columns"),
    ("ImageID,StudyDate_DICOM,PatientID,Mass,Normal,Mass\na.png,1,1,0,0,0\n",
     r"duplicated column.*'Mass' \(columns 4, 6\)"),
    (HEADER + "a.png,1,1,0,2,0\n", r"row 2, column 'Mass': '2'"),
    (HEADER + "a.png,1,1,0,0,0\nb.png,1,1,,0,0\n", r"row 3, column 'Normal': a blank cell"),
    (HEADER + "a.png,1,1,0,0,1.0\n", r"row 2, column 'Hernia': '1.0'"),
    (HEADER + "a.png,1,1,0,0,0\nb.png,1,1,0,0,0\na.png,1,1,1,0,0\n",
     r"row 4, column 1 \('ImageID'\): duplicate ImageID 'a.png' \(first at row 2\)"),
    (HEADER + "a.png,1,1,0,0,0,1\n", r"row 2 has 7 fields but the header has 6"),
    (HEADER + ",1,1,0,0,0\n", r"row 2, column 1 \('ImageID'\): blank ImageID"),
])
def test_bad_training_csv_names_file_and_row(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(InputError, match=pattern) as e:
        read_training_csv(path)
    assert str(path) in str(e.value)


def test_many_bad_cells_are_summarised(tmp_path):
    rows = "".join(f"i{i}.png,1,1,2,0,0\n" for i in range(10))
    with pytest.raises(InputError, match=r"and 7 more bad cells"):
        read_training_csv(write(tmp_path, HEADER + rows))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_training_csv(tmp_path / "nope.csv")


def test_official_test_list_with_30_empty_trailing_columns(tmp_path):
    commas = "," * 30
    text = (f"ImageID,StudyDate_DICOM,PatientID{commas}\n"
            f"100303250289824462365601716073337204998_42hmtt.png,20161010,1.90E+38{commas}\n"
            f"100314450852379498616738398237033471531_fft9bx.png,20170327,3.09E+38{commas}\n")
    df = read_id_list(write(tmp_path, text, "test.csv"))
    assert list(df.columns) == ["ImageID", "StudyDate_DICOM", "PatientID"]
    assert df["PatientID"].tolist() == ["1.90E+38", "3.09E+38"]
    assert df["ImageID"].iloc[1] == "100314450852379498616738398237033471531_fft9bx.png"


def test_id_list_without_optional_columns(tmp_path):
    df = read_id_list(write(tmp_path, "ImageID\nx.png\ny.png\n", "ids.csv"))
    assert df["ImageID"].tolist() == ["x.png", "y.png"]
    assert df["PatientID"].tolist() == ["", ""]


@pytest.mark.parametrize("text, pattern", [
    ("ImageID\nx.png\ny.png\nx.png\n", r"row 4, column 1 \('ImageID'\): duplicate ImageID 'x.png' \(first at row 2\)"),
    ("Image,PatientID\nx.png,1\n", r"missing column 'ImageID'; did you mean 'Image'"),
    ("ImageID\n", r"no data rows"),
])
def test_bad_id_list(tmp_path, text, pattern):
    with pytest.raises(InputError, match=pattern):
        read_id_list(write(tmp_path, text, "ids.csv"))


def test_removal_list_may_be_empty_when_allowed(tmp_path):
    assert len(read_id_list(write(tmp_path, "ImageID\n", "r.csv"), allow_empty=True)) == 0


def test_label_table_index_and_training_layout(tmp_path):
    index = write(tmp_path, "row,ImageID,StudyDate_DICOM,PatientID,split,fold,A,B\n0,a.png,1,007,train,0,1,0\n"
                            "1,b.png,1,008,train,1,1,1\n2,c.png,1,009,test,-1,,\n", "index.csv")
    t = read_label_table(index, ids=["b.png"])
    assert t.is_index and t.labels == ["A", "B"] and t.y.tolist() == [[1, 1]]
    assert t.train_counts.tolist() == [2, 1] and t.n_train == 2
    with pytest.raises(InputError, match=r"row 4: blank label cells: no ground truth for ImageID 'c.png'"):
        read_label_table(index, ids=["c.png"])
    with pytest.raises(InputError, match=r"no row for ImageID 'zz.png'"):
        read_label_table(index, ids=["zz.png"])
    train = write(tmp_path, "ImageID,StudyDate_DICOM,PatientID,A,B\na.png,1,2,1,0\nb.png,1,2,0,2\n", "labels.csv")
    with pytest.raises(InputError, match=r"row 3, column 'B': '2'"):
        read_label_table(train, ids=["a.png", "b.png"])
    with pytest.raises(InputError, match=r"row 3: ImageID 'b.png' has no row in"):
        read_label_table(train, ids=["a.png"])


def test_label_table_of_an_index_with_key_columns(tmp_path):
    """The index gains study/patient/projection columns: they are not labels."""
    index = write(tmp_path, "row,ImageID,StudyDate_DICOM,PatientID,study,patient,projection,split,fold,A,B\n"
                            "0,a.png,1,007,s1,p1,PA,train,0,1,0\n1,b.png,1,008,s2,p2,L,train,1,0,1\n", "index.csv")
    t = read_label_table(index)
    assert t.labels == ["A", "B"] and t.ids == ["a.png", "b.png"] and t.train_counts.tolist() == [1, 1]


def test_read_predictions_matches_by_name_unless_strict(tmp_path):
    path = write(tmp_path, "ImageID,Hernia,Normal,Mass\na.png,0.1,0.2,0.3\n\nb.png,0.4,0.5,0.6\n", "p.csv")
    df = read_predictions(path, ["Normal", "Mass", "Hernia"])
    assert list(df.columns) == ["Normal", "Mass", "Hernia"] and df.loc["b.png", "Mass"] == pytest.approx(0.6)
    with pytest.raises(InputError, match="wrong column order"):
        read_predictions(path, ["Normal", "Mass", "Hernia"], strict_order=True)
    bad = write(tmp_path, "ImageID,A\na.png,0.1\n\nb.png,x\n", "bad.csv")
    with pytest.raises(InputError, match=r"row 4, column 2 \('A'\): not a number"):  # blank line counted
        read_predictions(bad)
