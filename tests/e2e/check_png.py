"""Checks a screenshot is not blank: decodes the PNG with the standard library only and requires
enough non-background pixels and the chart's line colours. Usage: check_png.py FILE.png"""
import struct
import sys
import zlib


def decode(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6), f"unsupported PNG (depth {depth}, colour type {ctype})"
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev, i = [], bytearray(stride), 0
    for _ in range(height):
        f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def main():
    width, height, bpp, rows = decode(sys.argv[1])
    background = rows[0][:3]
    differing, colours = 0, set()
    for row in rows:
        for x in range(0, len(row), bpp):
            px = row[x:x + 3]
            if px != background:
                differing += 1
            colours.add(bytes(px))
    share = differing / (width * height)
    # The smoothed loss line (#1f5fbf) and the eval points (#e8590c) must be on screen.
    needed = {"smoothed loss": bytes.fromhex("1f5fbf"), "eval loss": bytes.fromhex("e8590c")}
    missing = [name for name, rgb in needed.items() if rgb not in colours]
    print(f"{sys.argv[1]}: {width}x{height}, {share:.1%} non-background pixels, {len(colours)} colours")
    if share < 0.05 or len(colours) < 50 or missing:
        print(f"FAIL: the chart looks blank or incomplete (missing: {missing})")
        sys.exit(1)
    print("OK: the chart rendered")


if __name__ == "__main__":
    main()
