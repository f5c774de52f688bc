"""Pointer-level entry points over the C ABI, for callers that hold raw device pointers (the
TensorRT plugin's enqueue). No torch here: every argument is an int (a pointer or a size) and
the stream is a cudaStream_t as an int. Errors raise library.SawKernelError."""
from __future__ import annotations

import ctypes

from . import library
from .library import SawConfig


_sizes: dict[tuple, int] = {}


def workspace_bytes(cfg: SawConfig, num_seqs: int, num_tokens: int, max_seq_len: int) -> int:
    """Workspace that attention_step_ptr (and decode/prefill) need for these sizes (upper
    bounds are fine: it covers every smaller batch too); 0 means none. Remembered per
    configuration and size: the library plans every batch up to num_seqs (~20 us at 256)."""
    key = (bytes(cfg), id(library.load()), num_seqs, num_tokens, max_seq_len)
    n = _sizes.get(key)
    if n is None:
        lib = library.load()
        n = _sizes[key] = int(lib.saw_workspace_bytes(ctypes.byref(cfg), num_seqs, num_tokens,
                                                      max_seq_len))
    return n


def attention_step_ptr(cfg: SawConfig, qkv_ptr: int, qkv_stride: int, pool_ptr: int,
                       block_tables_ptr: int, max_pages: int, seq_lens_ptr: int,
                       cu_q_lens_ptr: int, num_seqs: int, num_tokens: int, max_q_len: int,
                       max_seq_len: int, out_ptr: int, workspace_ptr: int, workspace_bytes: int,
                       stream_ptr: int) -> None:
    """One attention layer of a mixed batch: slots from the block tables, write K/V of the new
    tokens into the pool, attention of every new token (decode kernel when max_q_len == 1 and
    num_tokens == num_seqs, else prefill). Shapes as in c_api.h: qkv [num_tokens, qkv_stride]
    (elements), block_tables [num_seqs, max_pages] int32, seq_lens [num_seqs] int32 (new tokens
    included), cu_q_lens [num_seqs + 1] int32, out [num_tokens, Hq*D]. Never synchronizes."""
    lib = library.load()
    library.check(lib.saw_attention_step(
        ctypes.byref(cfg), qkv_ptr, qkv_stride, pool_ptr, block_tables_ptr, max_pages,
        seq_lens_ptr, cu_q_lens_ptr, num_seqs, num_tokens, max_q_len, max_seq_len, out_ptr,
        workspace_ptr or None, workspace_bytes, stream_ptr or None), lib)


def write_kv_ptr(cfg: SawConfig, qkv_ptr: int, qkv_stride: int, slot_mapping_ptr: int,
                 num_tokens: int, pool_ptr: int, stream_ptr: int) -> None:
    lib = library.load()
    library.check(lib.saw_write_kv(ctypes.byref(cfg), qkv_ptr, qkv_stride, slot_mapping_ptr,
                                   num_tokens, pool_ptr, stream_ptr or None), lib)


def decode_ptr(cfg: SawConfig, q_ptr: int, q_stride: int, pool_ptr: int, block_tables_ptr: int,
               max_pages: int, seq_lens_ptr: int, num_seqs: int, max_seq_len: int, out_ptr: int,
               workspace_ptr: int, workspace_bytes: int, stream_ptr: int) -> None:
    lib = library.load()
    library.check(lib.saw_decode(ctypes.byref(cfg), q_ptr, q_stride, pool_ptr, block_tables_ptr,
                                 max_pages, seq_lens_ptr, num_seqs, max_seq_len, out_ptr,
                                 workspace_ptr or None, workspace_bytes, stream_ptr or None), lib)


def prefill_ptr(cfg: SawConfig, q_ptr: int, q_stride: int, pool_ptr: int, block_tables_ptr: int,
                max_pages: int, seq_lens_ptr: int, cu_q_lens_ptr: int, num_seqs: int,
                num_tokens: int, max_q_len: int, max_seq_len: int, out_ptr: int,
                workspace_ptr: int, workspace_bytes: int, stream_ptr: int) -> None:
    lib = library.load()
    library.check(lib.saw_prefill(ctypes.byref(cfg), q_ptr, q_stride, pool_ptr, block_tables_ptr,
                                  max_pages, seq_lens_ptr, cu_q_lens_ptr, num_seqs, num_tokens,
                                  max_q_len, max_seq_len, out_ptr, workspace_ptr or None,
                                  workspace_bytes, stream_ptr or None), lib)
