"""Every repository path a doc or a code comment cites exists.

Scanned: README.md, docs/*.md and */README.md (CHANGELOG.md is history and may name what is
gone), the comments and docstrings of the Python, CUDA/C++ and shell files under sawtrt/,
cpp/, trt_plugin/, benchmarks/ and build_scripts/, and the whole text of the shell scripts
there (their commands name paths too). A citation is a path that starts at a top-level entry
of the repository (`sawtrt/spec.py`, `docs/perf/*.json`, `docs/perf/x.{json,png}`), a
relative Markdown link (`](perf/x.png)`), or a bare Markdown file name (`DESIGN.md`).
"""
from __future__ import annotations

import ast
import glob
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# top-level entries a citation may start from: what the repository tracks, not build outputs
_NOT_SOURCE = {".git", ".venv", "build", "engines", ".carry", ".whl", ".pytest_cache",
               "__pycache__", "dist"}
CODE_DIRS = ("sawtrt", "cpp", "trt_plugin", "benchmarks", "build_scripts")
C_SUFFIXES = {".cu", ".cuh", ".h", ".hpp", ".cc", ".cpp"}

_BRACE = r"\{[\w.,+\-]*\}"
_PATH_CHARS = rf"(?:[\w.+\-/*]|{_BRACE})"
_MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
_MD_NAME = re.compile(r"(?<![\w./\-$~])([A-Za-z][\w\-]*\.md)\b")


def top_level_names(root: Path = ROOT) -> list[str]:
    return sorted(p.name for p in root.iterdir()
                  if p.name not in _NOT_SOURCE and not p.name.endswith(".egg-info"))


def _path_regex(names: list[str]) -> re.Pattern:
    alt = "|".join(re.escape(n) for n in names)
    # not preceded by a path or variable character: `$OUT/docs/x`, `/tmp/sawtrt/x`, `a.docs/x`
    return re.compile(rf"(?<![\w./\-$~{{}}])((?:{alt})(?:/{_PATH_CHARS}*)?)")


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(_BRACE, pattern)
    if not m:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [x for alt in m.group(0)[1:-1].split(",") for x in _expand_braces(head + alt + tail)]


def _exists(path: str, base: Path, root: Path) -> bool:
    for p in _expand_braces(path):
        full = str((base / p) if not p.startswith("/") else root / p.lstrip("/"))
        if not (glob.glob(full) if any(c in p for c in "*?[") else Path(full).exists()):
            return False
    return True


def _md_names(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*.md")
            if not set(p.relative_to(root).parts) & _NOT_SOURCE}


def bad_citations(text: str, source: Path, root: Path = ROOT, markdown: bool = False) -> list[str]:
    """The cited repository paths in `text` (a doc, or the comments of `source`) that do not
    exist under `root`."""
    names = [n for n in top_level_names(root) if (root / n).is_dir() or "." in n]
    bad = []
    for m in _path_regex(names).finditer(text):
        path = m.group(1).rstrip(".,")
        if "/" not in path and not (root / path).is_file():
            continue                                # a bare word such as "docs" or "tests"
        if not _exists(path, root, root):
            bad.append(path)
    if markdown:
        for m in _MD_LINK.finditer(text):
            target = m.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            if not _exists(target, source.parent, root):
                bad.append(target)
    known = _md_names(root)
    for m in _MD_NAME.finditer(text):
        if m.group(1) not in known:
            bad.append(m.group(1))
    return bad


def comments_of(path: Path) -> str:
    """Comments and docstrings of a source file (the whole text of a shell script)."""
    text = path.read_text(errors="replace")
    if path.suffix == ".sh":
        return text
    if path.suffix == ".py":
        parts = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
                 if t.type == tokenize.COMMENT]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    parts.append(doc)
        return "\n".join(parts)
    if path.suffix in C_SUFFIXES:
        return "\n".join(m.group(0) for m in re.finditer(r"//[^\n]*|/\*.*?\*/", text, re.S))
    return ""


def doc_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", *sorted((root / "docs").glob("*.md")),
             *sorted(root.glob("*/README.md"))]
    return [f for f in files if f.is_file() and f.parts[-2] not in _NOT_SOURCE]


def code_files(root: Path = ROOT) -> list[Path]:
    out = []
    for d in CODE_DIRS:
        for p in sorted((root / d).rglob("*")):
            if p.is_file() and (p.suffix in {".py", ".sh"} | C_SUFFIXES) \
                    and "__pycache__" not in p.parts:
                out.append(p)
    return out


def test_checker_catches_planted_bad_paths(tmp_path):
    (tmp_path / "sawtrt").mkdir()
    (tmp_path / "cpp").mkdir()
    (tmp_path / "sawtrt" / "spec.py").write_text('"""The contract."""\n')
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# Design\n")
    (tmp_path / "docs" / "perf").mkdir()
    (tmp_path / "docs" / "perf" / "a.json").write_text("{}")
    doc = ("See `sawtrt/spec.py`, docs/design.md, `docs/perf/*.json` and [a](perf/a.json).\n"
           "Broken: `sawtrt/no_such.py`, DESIGN.md, docs/perf/{a,b}.json, [b](perf/b.png),\n"
           "and not citations: $OUT/sawtrt/x.py, /tmp/docs/y.md, the docs folder.\n")
    bad = bad_citations(doc, tmp_path / "docs" / "x.md", root=tmp_path, markdown=True)
    assert sorted(bad) == sorted(["sawtrt/no_such.py", "DESIGN.md", "docs/perf/{a,b}.json",
                                  "perf/b.png"])
    src = tmp_path / "sawtrt" / "m.py"
    src.write_text('"""Uses sawtrt/spec.py."""\nX = "sawtrt/not_a_comment.py"  # see cpp/gone.cuh\n')
    assert bad_citations(comments_of(src), src, root=tmp_path) == ["cpp/gone.cuh"]
    cu = tmp_path / "sawtrt" / "k.cuh"
    cu.write_text("// the algebra of DESIGN.md\n/* and docs/design.md */ int docs = 0;\n")
    assert bad_citations(comments_of(cu), cu, root=tmp_path) == ["DESIGN.md"]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_cites_existing_paths(path):
    bad = bad_citations(path.read_text(), path, markdown=True)
    assert not bad, f"{path.relative_to(ROOT)} cites paths that do not exist: {bad}"


def test_code_comments_cite_existing_paths():
    bad = {str(p.relative_to(ROOT)): b for p in code_files()
           if (b := bad_citations(comments_of(p), p))}
    assert not bad, f"comments cite paths that do not exist: {bad}"
