"""Tokenizers: byte-level BPE built from GGUF metadata, HF tokenizer.json, and a byte tokenizer
for random-weight engines that have no vocabulary of their own.

All expose `encode(text) -> list[int]`, `decode(ids, skip_special_tokens=True) -> str`,
`eos_token_id`, `bos_token_id`, `vocab_size` and `to_json() -> str` (what the engine dir stores).
"""
from __future__ import annotations

import json
from pathlib import Path

# Pre-tokenizer regexes of the llama.cpp "pre" names we support (same splits as the HF files).
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                   r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL = 3   # llama.cpp token type of special (control) tokens


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer`."""

    def __init__(self, tok, bos_token_id=None, eos_token_id=None, add_bos=False,
                 chat_template: str | None = None):
        self._tok = tok
        self.bos_token_id, self.eos_token_id, self.add_bos = bos_token_id, eos_token_id, add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, user_message: str) -> str:
        """Render a one-turn chat prompt with the model's own template (jinja2)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        import jinja2
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": user_message}], add_generation_prompt=True,
            bos_token="", eos_token="")

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text(self.to_json())
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "kind": "bpe", "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "add_bos": self.add_bos, "chat_template": self.chat_template}, indent=1,
            sort_keys=True))


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 (+ `offset`); for random-weight engines only (explicit)."""

    def __init__(self, vocab_size: int, eos_token_id=None, bos_token_id=None):
        if vocab_size < 256:
            raise ValueError("a byte tokenizer needs a vocabulary of at least 256")
        self.vocab_size, self.eos_token_id, self.bos_token_id = vocab_size, eos_token_id, \
            bos_token_id
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "kind": "bytes", "vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id}, indent=1, sort_keys=True))


def from_gguf(path) -> Tokenizer:
    """Byte-level BPE ("gpt2" model in llama.cpp terms) from a GGUF file's metadata."""
    import gguf
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok
    from tokenizers import AddedToken

    reader = gguf.GGUFReader(str(path))

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (byte-level BPE only)")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTok(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = field("tokenizer.ggml.pre", "default")
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in ("qwen2", "llama-bpe"):
        pattern = _QWEN2_PATTERN if pre == "qwen2" else _LLAMA3_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported "
                         "(smollm, qwen2, llama-bpe, gpt2)")
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if int(ty) == _CONTROL]
    tok.add_special_tokens(special)
    bos = field("tokenizer.ggml.bos_token_id")
    eos = field("tokenizer.ggml.eos_token_id")
    return Tokenizer(tok, None if bos is None else int(bos), None if eos is None else int(eos),
                     bool(field("tokenizer.ggml.add_bos_token", False)),
                     field("tokenizer.chat_template"))


def from_hf_dir(path) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json / config.json for special ids) of an HF dir."""
    from tokenizers import Tokenizer as HFTok
    path = Path(path)
    tok = HFTok.from_file(str(path / "tokenizer.json"))
    cfg = {}
    for name in ("config.json", "tokenizer_config.json"):
        if (path / name).is_file():
            cfg.update(json.loads((path / name).read_text()))
    eos = cfg.get("eos_token_id")
    if isinstance(cfg.get("eos_token"), str):
        eos = tok.token_to_id(cfg["eos_token"])
    elif isinstance(eos, list):
        eos = eos[0]
    return Tokenizer(tok, cfg.get("bos_token_id"), eos, bool(cfg.get("add_bos", False)),
                     cfg.get("chat_template"))


def load(engine_dir) -> Tokenizer | ByteTokenizer:
    """The tokenizer stored in an engine directory."""
    engine_dir = Path(engine_dir)
    cfg = json.loads((engine_dir / "tokenizer_config.json").read_text())
    if cfg["kind"] == "bytes":
        return ByteTokenizer(cfg["vocab_size"], cfg.get("eos_token_id"), cfg.get("bos_token_id"))
    from tokenizers import Tokenizer as HFTok
    tok = HFTok.from_file(str(engine_dir / "tokenizer.json"))
    return Tokenizer(tok, cfg.get("bos_token_id"), cfg.get("eos_token_id"),
                     cfg.get("add_bos", False), cfg.get("chat_template"))
