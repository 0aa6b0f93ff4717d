#!/usr/bin/env python3
"""Writes kernels/tests/fixtures/quant/*.bin: ggml blocks with their dequantized values, and f32 rows with
their quantized bytes, both computed by the independent numpy implementation in gguf-py.

Usage: pip install gguf numpy && python3 scripts/gen-quant-fixtures.py

Formats (little-endian):
  <TYPE>.dequant.bin: u32 ggml type id, u32 n_elements, u32 n_bytes, block bytes, n_elements f32 (expected)
  <TYPE>.quant.bin:   u32 ggml type id, u32 n_elements, u32 n_bytes, n_elements f32 (input), block bytes (expected)
"""
import pathlib
import struct

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

OUT = pathlib.Path(__file__).resolve().parent.parent / "kernels" / "tests" / "fixtures" / "quant"

# Byte offsets of the f16 scale fields in each block; random bytes there could be inf/nan.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def header(ty, n_elements, n_bytes):
    return struct.pack("<III", int(ty), n_elements, n_bytes)


def random_blocks(rng, ty, n_blocks):
    block_len, block_bytes = GGML_QUANT_SIZES[ty]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    if ty in (T.F16, T.BF16):
        vals = rng.normal(size=n_blocks).astype(np.float32)
        if ty == T.F16:
            raw = vals.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        else:
            raw = (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
    for off in F16_FIELDS.get(ty, []):
        scale = (rng.normal(size=n_blocks) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw, n_blocks * block_len


def write_dequant(rng, ty, n_blocks):
    raw, n = random_blocks(rng, ty, n_blocks)
    expected = dequantize(raw.reshape(-1), ty).astype(np.float32).reshape(-1)
    assert expected.size == n and np.all(np.isfinite(expected))
    data = header(ty, n, raw.size) + raw.tobytes() + expected.tobytes()
    (OUT / f"{ty.name}.dequant.bin").write_bytes(data)


def write_quant(rng, ty, n_blocks):
    x = (rng.normal(size=(n_blocks, 32)) * rng.uniform(0.01, 3.0, size=(n_blocks, 1))).astype(np.float32)
    x[0] = 0.0                      # all-zero block: d = 0
    x[1] = 0.25                     # constant block: max == min for Q4_1
    x[2, 5] = -40.0                 # negative outlier sets the Q4_0 scale sign
    x[3] = np.linspace(-1.27, 1.27, 32, dtype=np.float32)  # values near rounding ties
    x = x.reshape(-1)
    q = quantize(x.reshape(1, -1), ty).reshape(-1)
    data = header(ty, x.size, q.size) + x.tobytes() + q.tobytes()
    (OUT / f"{ty.name}.quant.bin").write_bytes(data)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261122)
    for ty in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        write_dequant(rng, ty, 12)
    for ty in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        write_dequant(rng, ty, 3)
    for ty in (T.F16, T.BF16):
        write_dequant(rng, ty, 64)
    for ty in (T.Q8_0, T.Q4_0, T.Q4_1):
        write_quant(rng, ty, 12)
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} fixtures, {total} bytes, into {OUT}")


if __name__ == "__main__":
    main()
