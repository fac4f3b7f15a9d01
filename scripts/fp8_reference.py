#!/usr/bin/env python3
"""FP8 decoding and dequantization by ml_dtypes (an independent float8
implementation, pinned in scripts/test-requirements.txt), for tests/fp8.rs.

  decode e4m3|e5m2 OUT          the 256 codes as float32 little-endian
  encode IN OUT                 float32 values -> float8_e4m3fn codes (ties to even)
  dequant e4m3|e5m2 ROWS COLS TILE_ROWS TILE_COLS f32|bf16|f16 WEIGHTS SCALES OUT
                                bf16 bits (uint16 little-endian) of fp8 * scale,
                                one float32 product, NaN written as 0x7fc0
  dequant-model SRC DST         a bf16 copy of an FP8 safetensors model directory
                                (block-wise weight_scale_inv or compressed-tensors
                                weight_scale), the scale tensors dropped and
                                quantization_config removed

The safetensors files are parsed here (8-byte header length, JSON header, data),
so that nothing of the reader under test is shared.
"""
import json
import os
import shutil
import struct
import sys

import ml_dtypes
import numpy as np

FORMATS = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
SCALES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16, "f16": np.float16,
          "F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


def dequant(codes, fmt, scales, tile_rows, tile_cols):
    """bf16 bits of codes [rows, cols] times scales [grid rows, grid cols]."""
    rows, cols = codes.shape
    w = codes.view(FORMATS[fmt]).astype(np.float32)
    s = scales.astype(np.float32).reshape(-1, (cols + tile_cols - 1) // tile_cols)
    s = np.repeat(np.repeat(s, tile_rows, axis=0), tile_cols, axis=1)[:rows, :cols]
    x = w * s
    bits = x.astype(ml_dtypes.bfloat16).view(np.uint16).copy()
    bits[np.isnan(x)] = 0x7FC0
    return bits


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], e["shape"], data[b:end])
    return out


def write_safetensors(path, tensors):
    header, off = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, data in tensors.values():
            f.write(data)


def scale_tiles(method, wshape, sshape):
    rows, cols = wshape
    if method == "fp8" or (len(sshape) == 2 and sshape[1] != 1 and sshape != [1, 1]):
        return 128, 128
    if sshape in ([], [1], [1, 1]):
        return rows, cols
    return 1, cols


def dequant_model(src, dst):
    cfg = json.load(open(os.path.join(src, "config.json")))
    method = cfg.pop("quantization_config")["quant_method"]
    suffix = "_scale_inv" if method == "fp8" else "_scale"
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        p = os.path.join(src, name)
        if name.endswith(".safetensors"):
            tensors = read_safetensors(p)
            out = {}
            for tname, (dtype, shape, data) in tensors.items():
                if tname.endswith(suffix) and tname[: -len(suffix)] in tensors:
                    continue
                if dtype in ("F8_E4M3", "F8_E5M2"):
                    sd, sshape, sdata = tensors[tname + suffix]
                    tr, tc = scale_tiles(method, shape, sshape)
                    codes = np.frombuffer(data, np.uint8).reshape(shape)
                    scales = np.frombuffer(sdata, SCALES[sd])
                    data = dequant(codes, dtype, scales, tr, tc).tobytes()
                    dtype = "BF16"
                out[tname] = (dtype, shape, data)
            write_safetensors(os.path.join(dst, name), out)
        elif name != "config.json" and os.path.isfile(p):
            shutil.copy(p, os.path.join(dst, name))
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=1)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "decode":
        np.arange(256, dtype=np.uint8).view(FORMATS[args[0]]).astype("<f4").tofile(args[1])
    elif cmd == "encode":
        x = np.fromfile(args[0], dtype="<f4")
        x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).tofile(args[1])
    elif cmd == "dequant":
        fmt, rows, cols, tr, tc, sdt, wpath, spath, out = args
        rows, cols, tr, tc = int(rows), int(cols), int(tr), int(tc)
        codes = np.fromfile(wpath, dtype=np.uint8).reshape(rows, cols)
        raw = np.fromfile(spath, dtype=np.uint8)
        scales = raw.view(SCALES[sdt])
        dequant(codes, fmt, scales, tr, tc).astype("<u2").tofile(out)
    elif cmd == "dequant-model":
        dequant_model(args[0], args[1])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
