#!/usr/bin/env python3
"""Reads meson's testlog.json and prints each test's own counts, then "N passed, N failed".

Each meson test is a file of many checks; the Python ones end with "N passed, M failed" and the
Catch2 binary with its "test cases:" line, so the total counts checks, not files. A test that
printed no count counts as one, by its meson result."""
import json
import re
import sys

passed = failed = skipped = 0
for line in open(sys.argv[1]):
    entry = json.loads(line)
    out = entry.get("stdout") or ""
    name, result = entry["name"], entry["result"]
    if result == "SKIP":
        skipped += 1
        print(f"{name}: skipped")
        continue
    m = re.findall(r"^(\d+) passed, (\d+) failed", out, re.M)
    c = re.search(r"test cases:\s+(\d+)\s+\|\s+(\d+) passed(?:\s+\|\s+(\d+) failed)?", out)
    a = re.search(r"All tests passed \(\d+ assertions? in (\d+) test cases?\)", out)
    if m:
        p, f = int(m[-1][0]), int(m[-1][1])
    elif a:
        p, f = int(a.group(1)), 0
    elif c:
        p, f = int(c.group(2)), int(c.group(3) or 0)
    else:
        p, f = (1, 0) if result == "OK" else (0, 1)
    if result != "OK" and f == 0:
        f = 1  # crashed or timed out after its last count: never report that as green
    passed += p
    failed += f
    print(f"{name}: {p} passed, {f} failed ({result}, {entry.get('duration', 0):.1f}s)")
line = f"{passed} passed, {failed} failed"
if skipped:
    line += f", {skipped} skipped"
print(line)
