#!/usr/bin/env python3
"""Checks that a pairs file written by `agfsync export --pairs` reads as
Pick-a-Pic in the Python tools: pyarrow (and Hugging Face `datasets` when it
is installed) must see the columns with the right types, Pillow must decode
every image, and label_0 must be a preference (0, 0.5 or 1).

    python tools/interop/check_pickapic_parquet.py pairs.parquet

Exit status 0 when everything holds; the findings are printed either way.
"""
import io
import sys

import pyarrow.parquet as pq
from PIL import Image


def main(path):
    table = pq.read_table(path)
    print(f"{path}: {table.num_rows} rows, row groups: {pq.ParquetFile(path).num_row_groups}")
    print(table.schema)
    need = {"caption": "string", "jpg_0": "binary", "jpg_1": "binary", "label_0": "double"}
    ok = True
    for col, typ in need.items():
        if col not in table.column_names:
            print(f"missing column {col}")
            ok = False
        elif str(table.schema.field(col).type) != typ:
            print(f"column {col} is {table.schema.field(col).type}, expected {typ}")
            ok = False
    rows = table.to_pylist()
    for i, r in enumerate(rows):
        for c in ("jpg_0", "jpg_1"):
            try:
                im = Image.open(io.BytesIO(r[c]))
                im.load()
            except Exception as e:  # noqa: BLE001 - report every failure
                print(f"row {i} {c}: Pillow cannot decode it: {e}")
                ok = False
        if r["label_0"] not in (0.0, 0.5, 1.0):
            print(f"row {i}: label_0 = {r['label_0']}")
            ok = False
    try:
        import datasets  # noqa: F401

        ds = datasets.load_dataset("parquet", data_files=path, split="train")
        print(f"datasets: {len(ds)} rows, features {list(ds.features)}")
    except ImportError:
        print("datasets is not installed: checked with pyarrow only")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
