"""Text for evaluation and calibration: real English from installed packages, cut into windows.

Every source is located by content (not by a byte offset that moves between versions) and
pinned by the sha256 of the extracted text, which every result records; a pinned source whose
text differs is refused (CorpusError), so a number always names exactly the text it came from.

Held-out protocol: the evaluation sources and the calibration sources are disjoint documents
(`check_disjoint` refuses shared passages), three genres each.

    eval (EVAL_SOURCES)
    pyref       technical: Python's language reference as shipped with CPython in the standard
                library module pydoc_data.topics (the text `help()` shows): topics 'objects',
                'types', 'execmodel', joined by a blank line (pinned per CPython version)
    gpl3        legal: the GNU GPL version 3 text (from "GNU GENERAL PUBLIC LICENSE / Version 3,
                29 June 2007" to "END OF TERMS AND CONDITIONS", indentation kept) in
                yamllint==1.38.0's dist-info/licenses/LICENSE; numpy 2.4.x wheels carry the
                identical text, used when yamllint is absent
    chat        conversational: the English small-talk dialogues of chatterbot-corpus==1.3.3
                (CHAT_FILES: ai, emotion, psychology, ... in that order), one "A:" / "B:" line per
                turn, a blank line between dialogues

    calibration (CALIB_SOURCES)
    calib       technical: pydoc_data topics 'typesseq', 'string-methods', 'typesmapping',
                'specialnames' (other chapters of the same reference)
    apache2     legal: the Apache License 2.0 text (from "Apache License" to "END OF TERMS AND
                CONDITIONS") in transformers' dist-info licenses/LICENSE
    chat-calib  conversational: chatterbot-corpus's tech_support and trivia dialogues

A user's own text: `file_text(PATH)` (`sawtrt eval --calib-text / --eval-text`), pinned by the
hash it has when read.

Windows: each source is tokenized whole (no special tokens), the first `tokens` tokens are cut
into consecutive windows of `window` tokens; each window is evaluated on its own, with the
model's BOS token (if it has one) in front: the model sees BOS + W tokens and is scored on
all W (teacher forcing), so `tokens` tokens of a source give exactly `tokens` predictions.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import sys
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("gpl3", "pyref")              # the same-source protocol of the older docs tables
EVAL_SOURCES = ("pyref", "gpl3", "chat")
CALIB_SOURCES = ("calib", "apache2", "chat-calib")
GENRES = {"pyref": "technical", "calib": "technical", "gpl3": "legal", "apache2": "legal",
          "chat": "conversational", "chat-calib": "conversational"}
PYREF_TOPICS = ("objects", "types", "execmodel")
CALIB_TOPICS = ("typesseq", "string-methods", "typesmapping", "specialnames")
GPL_START = "GNU GENERAL PUBLIC LICENSE"
GPL_VERSION = "Version 3, 29 June 2007"
GPL_END = "END OF TERMS AND CONDITIONS"
GPL3_SHA256 = "5220a7ab700b568136ff65182b41e9658f1a980c50fba36425f0ede86ac68652"
GPL3_PACKAGES = ("yamllint", "numpy")
APACHE_START = "Apache License"
APACHE_VERSION = "Version 2.0, January 2004"
APACHE_PACKAGES = ("transformers",)
CHAT_PACKAGE = "chatterbot-corpus"
CHAT_FILES = ("ai", "emotion", "psychology", "conversations", "humor", "literature", "money",
              "science", "movies", "greetings", "sports", "gossip", "politics", "food",
              "computers", "history", "botprofile", "health")
CHAT_CALIB_FILES = ("tech_support", "trivia")
# sha256 of the extracted text. pydoc_data's text changes with the CPython release: pinned per
# version seen; another version's text is used, recorded with its hash and marked unpinned.
PINS = {
    "gpl3": GPL3_SHA256,
    "apache2": "59899c6091b540582ed617e8eeaac4919dc985ccfc35459ee9752b699be5205b",
    "chat": "b1ebb742598e8547c6db8446cb08cc9727c6c064a7934d0ccc1789fa8f14247b",
    "chat-calib": "7feb5c793d251fafc78a715e32a7ac749d8c90c92128f03e3ad398b01e597b3a",
}
PYDOC_PINS = {
    ("pyref", "3.11.7"): "d55ceeb493533994243ccf8812c4115e3f01703167d17112aea51a0dc935de06",
    ("calib", "3.11.7"): "14524b9f604c71d1555446daefbfe27d08561d1e83d32850b0f98bc528943fd3",
}
# a shared passage: this many consecutive words found in both a calibration and an eval text
SHINGLE_WORDS = 12


class CorpusError(RuntimeError):
    pass


@dataclass(frozen=True)
class Text:
    name: str
    text: str
    origin: str          # package, file, byte range
    genre: str = ""
    pinned: bool = True  # False: a user's file or an unpinned CPython version (hash recorded)

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> dict:
        return {"source": self.name, "genre": self.genre, "origin": self.origin,
                "sha256": self.sha256, "pinned": self.pinned, "chars": len(self.text)}


def _pinned(t: Text) -> Text:
    want = PINS.get(t.name)
    if want is not None and t.sha256 != want:
        raise CorpusError(f"text {t.name!r} from {t.origin} has sha256 {t.sha256[:16]}…, "
                          f"pinned {want[:16]}…: a different version of its package")
    return t


def _licence_in(dist_name: str, start_mark: str, version_mark: str, name: str):
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if "dist-info" not in str(f) or Path(str(f)).name not in ("LICENSE", "LICENSE.txt", "COPYING"):
            continue
        path = Path(dist.locate_file(f))
        raw = path.read_bytes() if path.exists() else b""
        head = raw.find(version_mark.encode())
        start = raw.rfind(start_mark.encode(), 0, head) if head >= 0 else -1
        end = raw.find(GPL_END.encode(), head) if head >= 0 else -1
        if min(head, start, end) < 0:
            continue
        start = raw.rfind(b"\n", 0, start) + 1            # keep the line's indentation
        end += len(GPL_END)
        text = raw[start:end].decode()
        if hashlib.sha256(text.encode()).hexdigest() == PINS[name]:
            return Text(name, text, f"{dist_name}=={dist.version} {f} bytes [{start}, {end})",
                        GENRES[name])
    return None


# name -> (packages whose wheel may ship the text, its first line, its version line, what to
# install when none does)
_LICENCES = {
    "gpl3": (GPL3_PACKAGES, GPL_START, GPL_VERSION,
             "the GPL-3 text was not found: pip install yamllint==1.38.0 "
             "(or the project's [eval] extra)"),
    "apache2": (APACHE_PACKAGES, APACHE_START, APACHE_VERSION,
                "the Apache-2.0 text was not found in transformers' wheel: "
                "pip install the project's [eval] extra"),
}


def _licence_text(name: str) -> Text:
    packages, start_mark, version_mark, missing = _LICENCES[name]
    for dist_name in packages:
        t = _licence_in(dist_name, start_mark, version_mark, name)
        if t is not None:
            return t
    raise CorpusError(missing)


def gpl3_text() -> Text:
    return _licence_text("gpl3")


def apache2_text() -> Text:
    return _licence_text("apache2")


def _topics(name: str, keys) -> Text:
    from pydoc_data import topics
    v = ".".join(map(str, sys.version_info[:3]))
    text = "\n\n".join(topics.topics[k] for k in keys)
    t = Text(name, text, f"CPython {v} stdlib pydoc_data/topics.py topics {', '.join(keys)}",
             GENRES[name], pinned=(name, v) in PYDOC_PINS)
    want = PYDOC_PINS.get((name, v))
    if want is not None and t.sha256 != want:
        raise CorpusError(f"pydoc_data text {name!r} of CPython {v} has sha256 "
                          f"{t.sha256[:16]}…, pinned {want[:16]}…")
    return t


def pyref_text() -> Text:
    return _topics("pyref", PYREF_TOPICS)


def calib_text() -> Text:
    return _topics("calib", CALIB_TOPICS)


def _chat_dialogues(files) -> tuple[list[list[str]], str]:
    """The dialogues (lists of turns) of chatterbot-corpus's English files, in `files` order."""
    try:
        dist = md.distribution(CHAT_PACKAGE)
    except md.PackageNotFoundError:
        raise CorpusError(f"conversational text needs `pip install --no-deps "
                          f"{CHAT_PACKAGE}==1.3.3` (or the project's [eval] extra)") from None
    import yaml
    root = Path(dist.locate_file("chatterbot_corpus/data/english"))
    out = []
    for name in files:
        data = yaml.safe_load((root / f"{name}.yml").read_text(encoding="utf-8"))
        for conv in data.get("conversations") or ():
            turns = [" ".join(str(t).split()) for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append(turns)
    return out, f"{CHAT_PACKAGE}=={dist.version} chatterbot_corpus/data/english/" \
        f"{{{','.join(files)}}}.yml"


def _dialogue_text(dialogues) -> str:
    return "\n\n".join("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(d))
                        for d in dialogues)


def chat_text() -> Text:
    d, origin = _chat_dialogues(CHAT_FILES)
    return _pinned(Text("chat", _dialogue_text(d), origin, GENRES["chat"]))


def chat_calib_text() -> Text:
    d, origin = _chat_dialogues(CHAT_CALIB_FILES)
    return _pinned(Text("chat-calib", _dialogue_text(d), origin, GENRES["chat-calib"]))


def chat_prompts(n: int = 64) -> list[str]:
    """The opening turns of the first n dialogues (distinct, in order) of the eval 'chat' text:
    prompts for the generation check; none occurs in any calibration source."""
    d, _ = _chat_dialogues(CHAT_FILES)
    seen, out = set(), []
    for turns in d:
        p = turns[0]
        if p.lower() not in seen and len(p.split()) >= 2:
            seen.add(p.lower())
            out.append(p)
    if len(out) < n:
        raise CorpusError(f"only {len(out)} distinct chat prompts, {n} asked")
    return out[:n]


def file_text(path, name: str | None = None) -> Text:
    """A user's own UTF-8 text file as a source (named by its file name)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read text file {str(p)!r}: {e}") from None
    if not text.strip():
        raise CorpusError(f"text file {str(p)!r} is empty")
    return Text(name or f"file:{p.name}", text, f"file {p.resolve()}", "user", pinned=False)


_LOADERS = {"gpl3": gpl3_text, "pyref": pyref_text, "calib": calib_text,
            "apache2": apache2_text, "chat": chat_text, "chat-calib": chat_calib_text}
SOURCE_NAMES = tuple(_LOADERS)


@functools.cache
def _named_text(name: str) -> Text:
    return _LOADERS[name]()       # packaged texts: read, joined and hash-checked once a process


def get_text(name) -> Text:
    """A named source (EVAL_SOURCES, CALIB_SOURCES) or a Text passed through."""
    if isinstance(name, Text):
        return name
    if name not in _LOADERS:
        raise CorpusError(f"unknown text source {name!r}; choose from {', '.join(_LOADERS)}")
    return _named_text(name)


def _shingles(text: str, n: int = SHINGLE_WORDS) -> set:
    w = text.lower().split()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def overlap(calib: Text, evaluated: Text, n: int = SHINGLE_WORDS) -> float:
    """Fraction of the eval text's n-word passages that also occur in the calibration text."""
    e = _shingles(evaluated.text, n)
    return len(e & _shingles(calib.text, n)) / max(1, len(e))


def check_disjoint(calib, evaluated, tolerance: float = 0.01) -> list[dict]:
    """Refuse (CorpusError) calibration and eval sources that share a name, a hash, or more than
    `tolerance` of the eval text's 12-word passages; returns the measured overlaps."""
    calib = [get_text(c) for c in calib]
    evaluated = [get_text(e) for e in evaluated]
    out = []
    for c in calib:
        for e in evaluated:
            if c.name == e.name or c.sha256 == e.sha256:
                raise CorpusError(f"calibration source {c.name!r} is also evaluated "
                                  f"({e.name!r}): the held-out protocol needs disjoint texts")
            f = overlap(c, e)
            out.append({"calib": c.name, "eval": e.name, "shared_passages": f})
            if f > tolerance:
                raise CorpusError(f"calibration source {c.name!r} shares {100 * f:.1f} % of "
                                  f"the 12-word passages of eval source {e.name!r} "
                                  f"(tolerance {100 * tolerance:.1f} %)")
    return out


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
        name = t.name
        ids = tokenizer(t.text, add_special_tokens=False).input_ids
        avail = len(ids) - offset
        if avail < tokens:
            raise CorpusError(f"{name} has {avail} tokens after offset {offset}, {tokens} asked")
        n = 0
        for i, s in enumerate(range(offset, offset + tokens, window)):
            chunk = ids[s:min(s + window, offset + tokens)]
            out.append(Window(name, i, s, tuple(([bos] if bos is not None else []) + chunk)))
            n += len(chunk)
        info.append({**t.describe(), "source_tokens": len(ids), "offset": offset,
                     "tokens": n, "windows": len(range(offset, offset + tokens, window))})
    return out, info
