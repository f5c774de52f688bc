"""Evaluation text: real English prose from installed packages, cut into token windows.

Two sources, both located by content (not by a byte offset that moves between versions) and
pinned by the sha256 of the extracted text, which every result records:

    gpl3      the GNU GPL version 3 text (from the line "GNU GENERAL PUBLIC LICENSE /
              Version 3, 29 June 2007" to "END OF TERMS AND CONDITIONS", indentation kept) in
              yamllint==1.38.0's yamllint-1.38.0.dist-info/licenses/LICENSE, bytes [0, 32472);
              numpy 2.4.x wheels carry the identical text inside their LICENSE.txt, used when
              yamllint is absent. Accepted only when its sha256 is GPL3_SHA256 (numpy 1.26's
              older copy differs in a few URLs and is refused).
    pyref     Python's language reference as shipped with CPython in the standard library
              module pydoc_data.topics (the text `help()` shows): the chapters
              "Objects, values and types", "The standard type hierarchy" and "Execution model"
              (topics 'objects', 'types', 'execmodel', in that order, joined by a blank line).
    calib     text disjoint from both, for calibration of variants: pydoc_data topics
              'typesseq', 'string-methods', 'typesmapping', 'specialnames'.

Windows: each source is tokenized whole (no special tokens), the first `tokens` tokens are cut
into consecutive windows of `window` tokens; each window is evaluated on its own, with the
model's BOS token (if it has one) in front: the model sees BOS + W tokens and is scored on
all W (teacher forcing), so `tokens` tokens of a source give exactly `tokens` predictions.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import sys
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("gpl3", "pyref")
PYREF_TOPICS = ("objects", "types", "execmodel")
CALIB_TOPICS = ("typesseq", "string-methods", "typesmapping", "specialnames")
GPL_START = "GNU GENERAL PUBLIC LICENSE"
GPL_VERSION = "Version 3, 29 June 2007"
GPL_END = "END OF TERMS AND CONDITIONS"
GPL3_SHA256 = "5220a7ab700b568136ff65182b41e9658f1a980c50fba36425f0ede86ac68652"
GPL3_PACKAGES = ("yamllint", "numpy")


class CorpusError(RuntimeError):
    pass


@dataclass(frozen=True)
class Text:
    name: str
    text: str
    origin: str          # package, file, byte range

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _gpl3_in(dist_name: str):
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if "dist-info" not in str(f) or Path(str(f)).name not in ("LICENSE", "LICENSE.txt", "COPYING"):
            continue
        path = Path(dist.locate_file(f))
        raw = path.read_bytes() if path.exists() else b""
        head = raw.find(GPL_VERSION.encode())
        start = raw.rfind(GPL_START.encode(), 0, head) if head >= 0 else -1
        end = raw.find(GPL_END.encode(), head) if head >= 0 else -1
        if min(head, start, end) < 0:
            continue
        start = raw.rfind(b"\n", 0, start) + 1            # keep the line's indentation
        end += len(GPL_END)
        text = raw[start:end].decode()
        if hashlib.sha256(text.encode()).hexdigest() == GPL3_SHA256:
            return Text("gpl3", text, f"{dist_name}=={dist.version} {f} bytes [{start}, {end})")
    return None


def gpl3_text() -> Text:
    for dist_name in GPL3_PACKAGES:
        t = _gpl3_in(dist_name)
        if t is not None:
            return t
    raise CorpusError("the GPL-3 text was not found: pip install yamllint==1.38.0 "
                      "(or the project's [eval] extra)")


def _topics(keys) -> str:
    from pydoc_data import topics
    return "\n\n".join(topics.topics[k] for k in keys)


def pyref_text() -> Text:
    v = ".".join(map(str, sys.version_info[:3]))
    return Text("pyref", _topics(PYREF_TOPICS),
                f"CPython {v} stdlib pydoc_data/topics.py topics {', '.join(PYREF_TOPICS)}")


def calib_text() -> Text:
    v = ".".join(map(str, sys.version_info[:3]))
    return Text("calib", _topics(CALIB_TOPICS),
                f"CPython {v} stdlib pydoc_data/topics.py topics {', '.join(CALIB_TOPICS)}")


def get_text(name: str) -> Text:
    try:
        return {"gpl3": gpl3_text, "pyref": pyref_text, "calib": calib_text}[name]()
    except KeyError:
        raise CorpusError(f"unknown text source {name!r}; choose from gpl3, pyref, calib") from None


@dataclass(frozen=True)
class Window:
    source: str
    index: int
    start: int            # first token index in the tokenized source
    ids: tuple[int, ...]  # BOS (if any) + the window's tokens

    @property
    def scored(self) -> int:
        return len(self.ids) - 1


def windows(tokenizer, sources=SOURCES, tokens: int = 2048, window: int = 512,
            offset: int = 0) -> tuple[list[Window], list[dict]]:
    """Windows over each source and a description of each source (origin, sha256, tokens).

    offset skips that many tokens of each source first (tests take a slice further in).
    """
    bos = tokenizer.bos_token_id
    out, info = [], []
    for name in sources:
        t = get_text(name)
        ids = tokenizer(t.text, add_special_tokens=False).input_ids
        avail = len(ids) - offset
        if avail < tokens:
            raise CorpusError(f"{name} has {avail} tokens after offset {offset}, {tokens} asked")
        n = 0
        for i, s in enumerate(range(offset, offset + tokens, window)):
            chunk = ids[s:min(s + window, offset + tokens)]
            out.append(Window(name, i, s, tuple(([bos] if bos is not None else []) + chunk)))
            n += len(chunk)
        info.append({"source": name, "origin": t.origin, "sha256": t.sha256,
                     "chars": len(t.text), "source_tokens": len(ids), "offset": offset,
                     "tokens": n, "windows": len(range(offset, offset + tokens, window))})
    return out, info
