#!/usr/bin/env python3
"""The `gguf` Python package (llama.cpp's gguf-py) as an independent reference
for the GGUF tests (run with the python that `scripts/test-env python` prints).

  gguf_reference.py dequant TYPE IN OUT   dequantize the raw blocks of TYPE in IN
                                          (gguf.quants.dequantize), write f32 to OUT
  gguf_reference.py quantize TYPE IN OUT  quantize the f32 values in IN to TYPE
                                          (gguf.quants.quantize), write the blocks to OUT
  gguf_reference.py describe FILE [--values]
                                          print, as JSON, what gguf.GGUFReader reads:
                                          version, alignment, every metadata field's
                                          types and value, every tensor's type, dims
                                          (innermost first), file offset and size;
                                          with --values also each tensor dequantized
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize


def cmd_dequant(type_name, src, dst):
    qtype = GGMLQuantizationType[type_name]
    raw = np.fromfile(src, dtype=np.uint8)
    out = dequantize(raw, qtype).astype(np.float32, copy=False)
    out.reshape(-1).tofile(dst)


def cmd_quantize(type_name, src, dst):
    qtype = GGMLQuantizationType[type_name]
    x = np.fromfile(src, dtype=np.float32)
    np.ascontiguousarray(quantize(x, qtype)).view(np.uint8).tofile(dst)


def field_value(field):
    # contents() decodes scalars, strings and flat arrays; nested arrays are
    # not supported by GGUFReader and are reported as null.
    try:
        return field.contents()
    except Exception:  # noqa: BLE001
        return None


def cmd_describe(path, values):
    r = GGUFReader(path)
    fields = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue  # the reader's own entries for the header counts
        fields[name] = {"types": [int(t) for t in f.types], "value": field_value(f)}
    tensors = []
    for t in r.tensors:
        d = {
            "name": t.name,
            "type": int(t.tensor_type),
            "dims": [int(x) for x in t.shape],
            "offset": int(t.data_offset),
            "n_bytes": int(t.n_bytes),
            "n_elements": int(t.n_elements),
        }
        if values:
            raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
            d["values"] = dequantize(raw, t.tensor_type).astype(np.float32).reshape(-1).tolist()
        tensors.append(d)
    version = int(r.fields["GGUF.version"].parts[-1][0])
    print(json.dumps({"version": version, "alignment": int(r.alignment), "fields": fields, "tensors": tensors}))


def main(argv):
    if len(argv) == 5 and argv[1] == "dequant":
        cmd_dequant(argv[2], argv[3], argv[4])
    elif len(argv) == 5 and argv[1] == "quantize":
        cmd_quantize(argv[2], argv[3], argv[4])
    elif len(argv) in (3, 4) and argv[1] == "describe":
        cmd_describe(argv[2], argv[3:] == ["--values"])
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
