#!/usr/bin/env python3
"""Lists the source files of each workspace crate that import each other back.

A file `a.rs` "imports" `b.rs` when it names `crate::b` (or `super::b` from a sibling, or
`crate::m::b` for a file `m/b.rs`) in a `use` or a path. Each pair a <-> b found is printed; the exit
status is 1 when there is one. Usage: scripts/file_circles.py [REPO]
"""

import pathlib
import re
import sys

CRATES = ["protocol", "registry", "model", "net", "node", "cli", "testkit", "tests"]


def module_of(src: pathlib.Path, f: pathlib.Path) -> tuple[str, ...]:
    rel = f.relative_to(src).with_suffix("")
    parts = rel.parts
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def paths_used(text: str, me: tuple[str, ...], is_mod_file: bool) -> set[tuple[str, ...]]:
    """Module paths this file names: crate::a::b, super::x, and `use` groups under them."""
    found = set()
    # Expand `use crate::{a, b::c}` groups one level deep.
    for m in re.finditer(r"\b(crate|super)((?:::\w+)*)::\{([^}]*)\}", text):
        base = m.group(1) + m.group(2)
        for item in m.group(3).split(","):
            item = item.strip().split(" as ")[0].strip()
            if item and item != "self":
                found.add(resolve(base + "::" + item, me, is_mod_file))
            elif item == "self":
                found.add(resolve(base, me, is_mod_file))
    for m in re.finditer(r"\b((?:crate|super)(?:::\w+)+)", text):
        found.add(resolve(m.group(1), me, is_mod_file))
    return {p for p in found if p is not None}


def resolve(path: str, me: tuple[str, ...], is_mod_file: bool):
    parts = path.split("::")
    if parts[0] == "crate":
        return tuple(parts[1:])
    # `super` is the parent of this module (the module itself for mod.rs? no: super of a::b is a).
    base = list(me)
    while parts and parts[0] == "super":
        if not base:
            return None
        base.pop()
        parts = parts[1:]
    return tuple(base + parts)


def main() -> int:
    repo = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    circles = 0
    for crate in CRATES:
        src = repo / crate / "src"
        if not src.is_dir():
            continue
        files = {module_of(src, f): f for f in src.rglob("*.rs")}
        deps: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
        for mod, f in files.items():
            text = strip_comments(f.read_text())
            # Only the file's own code: drop `#[cfg(test)] mod tests { ... }` (a test module may
            # name its parent's siblings freely).
            cut = re.search(r"#\[cfg\(test\)\]\s*(#\[[^\]]*\]\s*)*mod tests", text)
            if cut:
                text = text[: cut.start()]
            used = set()
            for p in paths_used(text, mod, f.name == "mod.rs"):
                # The longest prefix of p that is a file of this crate.
                for n in range(len(p), 0, -1):
                    if p[:n] in files:
                        if p[:n] != mod and p[:n] != ():
                            used.add(p[:n])
                        break
            deps[mod] = used
        for a, used in deps.items():
            for b in used:
                if a < b and a in deps.get(b, set()):
                    circles += 1
                    print(f"{crate}: {files[a].relative_to(repo)} <-> {files[b].relative_to(repo)}")
    if circles == 0:
        print("no file circles")
    return 1 if circles else 0


if __name__ == "__main__":
    sys.exit(main())
