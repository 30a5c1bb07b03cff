"""A reprod_log ``.npy`` holding a str, None or a list in one value: that key gets a ``type``
verdict naming what each side holds, and every other key of the file is compared as usual
(reprod_log's ``load_info`` read such files; refusing the whole file lost every key)."""

from __future__ import annotations

import numpy as np

import reprod


def test_non_numeric_values_are_type_verdicts_and_the_rest_compares(tmp_path) -> None:
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, {"logits": np.ones(4, np.float32), "arch": "resnet50", "cfg": None,
                "tags": [1, "x"]}, allow_pickle=True)
    np.save(b, {"logits": np.ones(4, np.float32) + np.float32(1e-3), "arch": "resnet50",
                "cfg": np.ones(2)}, allow_pickle=True)
    r = reprod.compare(a, b, method="max", threshold=1e-5)
    assert r["logits"].status == "failed"  # the numeric key is compared
    assert r["arch"].status == "type" and "ref holds a str ('resnet50')" in r["arch"].reason
    assert r["cfg"].status == "type" and "ref holds None" in r["cfg"].reason
    assert r["tags"].status == "missing" and "a list" in r["tags"].reason
    assert not r.passed
    # the table and the JSON report carry it without failing themselves
    assert "TYPE" in r.to_table()
    assert '"status": "type"' in r.to_json()
