"""Content fingerprints and the stage self-check (cxrlt/pipeline/fingerprints.py)."""

import os
import time

from cxrlt.pipeline import fingerprints as fp


def test_file_key_follows_content_not_time(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"weights-1")
    k1 = fp.file_key(f)
    assert (tmp_path / ".model.pt.sha256").exists()
    os.utime(f, (time.time() + 5, time.time() + 5))  # Make touches outputs
    assert fp.file_key(f) == k1
    f.write_bytes(b"weights-2")  # same size, new content
    os.utime(f, (time.time() + 10, time.time() + 10))
    assert fp.file_key(f) != k1


def test_file_key_does_not_trust_a_stale_sidecar(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 10)
    k = fp.file_key(f)
    st = f.stat()
    f.write_bytes(b"y" * 10)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert fp.file_key(f) != k


def test_inputs_match_and_differences(tmp_path):
    out = tmp_path / "pred.csv"
    inputs = {"model": "abc", "post": {"tta": "flip", "alpha": 1.0}}
    assert not fp.inputs_match(out, inputs)  # no output yet
    out.write_text("x")
    assert not fp.inputs_match(out, inputs)  # output without a record: not trusted
    fp.record_inputs(out, inputs)
    assert fp.inputs_match(out, {"post": {"alpha": 1.0, "tta": "flip"}, "model": "abc"})
    assert not fp.inputs_match(out, {**inputs, "model": "abd"})
    assert fp.differences(out, {**inputs, "model": "abd"}) == ["model"]
    assert fp.json_key({"a": 1, "b": 2}) == fp.json_key({"b": 2, "a": 1})
