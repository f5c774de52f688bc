"""Calling the decode kernel from torch tensors with preallocated workspace (for timing and for
the sandbox checks). Uses the full library (sawtrt.kernels.library) when built, else the
sandbox library build/libsawdecode_dev.so (cpp/dev/decode_dev.cu)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..spec import PageLayout

_REPO = Path(__file__).resolve().parents[2]
DEV_LIB = _REPO / "build" / "libsawdecode_dev.so"


class DecodeLib:
    """One loaded kernel library: `decode` and `workspace_bytes` with the saw_decode ABI."""

    def __init__(self, path: str | None = None):
        from ..kernels import library
        self.library = library
        self.full = None
        self.dev = None
        if path is None or not str(path).endswith("libsawdecode_dev.so"):
            try:
                self.full = library.load(path)
            except OSError:
                self.full = None
        if self.full is None:
            lib = ctypes.CDLL(str(path or DEV_LIB))
            p = ctypes.c_void_p
            lib.sawdev_decode.restype = ctypes.c_int
            lib.sawdev_decode.argtypes = [ctypes.POINTER(library.SawConfig), p, ctypes.c_int64,
                                          p, p, ctypes.c_int32, p, ctypes.c_int32,
                                          ctypes.c_int32, p, p, ctypes.c_size_t, p]
            lib.sawdev_decode_workspace_bytes.restype = ctypes.c_size_t
            lib.sawdev_decode_workspace_bytes.argtypes = [ctypes.POINTER(library.SawConfig),
                                                          ctypes.c_int32, ctypes.c_int32]
            lib.sawdev_last_error.restype = ctypes.c_char_p
            self.dev = lib
        self.name = "libsawtrt_kernels.so" if self.full is not None else "libsawdecode_dev.so"

    def config(self, layout: PageLayout, num_q_heads: int, dtype, signs: torch.Tensor | None):
        return self.library.make_config(layout, num_q_heads, dtype,
                                        signs_ptr=signs.data_ptr() if signs is not None else 0)

    def workspace_bytes(self, cfg, num_seqs: int, max_seq_len: int) -> int:
        if self.full is not None:
            return int(self.full.saw_workspace_bytes(ctypes.byref(cfg), num_seqs, num_seqs,
                                                     max_seq_len))
        return int(self.dev.sawdev_decode_workspace_bytes(ctypes.byref(cfg), num_seqs,
                                                          max_seq_len))

    def decode(self, cfg, q, pool_layer, block_tables, seq_lens, max_seq_len, out, ws,
               stream: int = 0) -> None:
        args = (ctypes.byref(cfg), q.data_ptr(), q.stride(0), pool_layer.data_ptr(),
                block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(),
                seq_lens.shape[0], max_seq_len, out.data_ptr(),
                ws.data_ptr() if ws is not None and ws.numel() else None,
                ws.numel() if ws is not None else 0, stream or None)
        if self.full is not None:
            self.library.check(self.full.saw_decode(*args), self.full)
        else:
            rc = self.dev.sawdev_decode(*args)
            if rc:
                raise RuntimeError(f"sawdev_decode: {rc} {self.dev.sawdev_last_error().decode()}")


class DecodeCall:
    """A prepared decode launch over fixed tensors: call it to run once (graph-capturable)."""

    def __init__(self, lib: DecodeLib, layout: PageLayout, q: torch.Tensor,
                 pool_layer: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 max_seq_len: int | None = None):
        self.lib = lib
        self.q, self.pool, self.bt = q, pool_layer, block_tables
        self.lens = seq_lens.to(device=q.device, dtype=torch.int32)
        self.max_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
        signs = layout.policy.signs(layout.head_dim)
        self.signs = signs.to(q.device) if signs is not None else None
        self.cfg = lib.config(layout, q.shape[1], q.dtype, self.signs)
        nbytes = lib.workspace_bytes(self.cfg, q.shape[0], self.max_len)
        self.ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=q.device)
        self.out = torch.empty_like(q)

    def __call__(self) -> torch.Tensor:
        self.lib.decode(self.cfg, self.q, self.pool, self.bt, self.lens, self.max_len, self.out,
                        self.ws, torch.cuda.current_stream().cuda_stream)
        return self.out
