#!/usr/bin/env python3
"""Fails when an #include goes against the layers (docs/architecture.md, "Layers"):
core/ includes only core/; discovery/ includes core/ and discovery/; proxy/ includes all three.
Usage: check-layers.py [source root]; prints each wrong include as file:line and exits 1."""
import pathlib
import re
import sys

LAYERS = ["core", "discovery", "proxy"]  # lowest first: a folder may include itself and those before it
INCLUDE = re.compile(r'\s*#\s*include\s*"([^/"]+)/')


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent)
    wrong, files = [], 0
    for rank, layer in enumerate(LAYERS):
        for path in sorted((root / layer).rglob("*")):
            if path.suffix not in (".h", ".cpp"):
                continue
            files += 1
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                m = INCLUDE.match(line)
                if m and m.group(1) in LAYERS and LAYERS.index(m.group(1)) > rank:
                    wrong.append(f"{path.relative_to(root)}:{number}: {layer}/ must not include {m.group(1)}/: {line.strip()}")
    if files == 0:
        print(f"no sources under {root}/{{{','.join(LAYERS)}}}")
        return 1
    for w in wrong:
        print(w)
    print(f"{files} files checked, {len(wrong)} includes against the layers ({' -> '.join(LAYERS)})")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
