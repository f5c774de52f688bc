"""The build's one up-to-date rule (sawtrt.build.state) and its use by the steps."""
import json

from runtime_helpers import build_tiny, digests, hf_checkpoint, tiny_spec
from sawtrt.build import BuildOptions, build_engine
from sawtrt.build.state import STATE_FILE, BuildState


def test_a_step_is_current_only_with_the_same_inputs_and_unchanged_outputs(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"one")
    st = BuildState(tmp_path)
    assert st.current("s", {"x": 1}) is None                     # never ran
    st.record("s", {"x": 1}, ["a.bin"], {"made": "a"})
    again = BuildState(tmp_path)                                  # read back from the file
    assert again.current("s", {"x": 1}) == {"made": "a"}
    assert again.current("s", {"x": 2}) is None                  # other inputs
    assert again.current("t", {"x": 1}) is None                  # another step
    (tmp_path / "a.bin").write_bytes(b"two")
    assert again.current("s", {"x": 1}) is None                  # output changed on disk
    (tmp_path / "a.bin").unlink()
    assert again.current("s", {"x": 1}) is None                  # output gone
    (tmp_path / STATE_FILE).write_text("{not json")
    assert BuildState(tmp_path).current("s", {"x": 1}) is None   # unreadable record: rebuild


def test_record_rewrites_the_file_only_when_it_changes(tmp_path):
    st = BuildState(tmp_path)
    st.record("s", {"x": 1}, [], [1, 2])
    path = tmp_path / STATE_FILE
    before = path.stat().st_mtime_ns
    st.record("s", {"x": 1}, [], [1, 2])
    assert path.stat().st_mtime_ns == before
    assert json.loads(path.read_text())["steps"]["s"]["result"] == [1, 2]


def test_a_changed_file_is_rebuilt_and_the_rest_kept(tmp_path):
    """A damaged tokenizer file makes the weights step run again; an edited config.json is
    rewritten; a second run after that changes nothing."""
    out = build_tiny(tmp_path, tiny_spec("llama"), kv_cache="int4-bdr")
    first = digests(out)
    (out / "tokenizer_config.json").write_text("{}")
    (out / "config.json").write_text("{}")
    build_tiny(tmp_path, tiny_spec("llama"), kv_cache="int4-bdr")
    assert digests(out) == first


def test_converted_weights_of_a_directory_without_a_record_are_kept(tmp_path):
    """An engine built before the build kept its record: config.json vouches for the weights
    (same source, same sha256), so they are not converted again; damaged weights are."""
    hf_checkpoint(tmp_path / "ckpt", tiny_spec("qwen3"))
    opts = BuildOptions(model="my-qwen", checkpoint=str(tmp_path / "ckpt"), kv_cache="int8",
                        page_size=16, max_seq_len=128, compile_kernels=False,
                        output=str(tmp_path / "eng"))
    out = build_engine(opts, log=lambda m: None, progress=False)
    first = digests(out)
    (out / STATE_FILE).unlink()
    logs = []
    build_engine(opts, log=logs.append, progress=False)
    assert any(m.startswith("weights: up to date") for m in logs), logs
    assert digests(out) == first
    (out / STATE_FILE).unlink()
    (out / "model.safetensors").write_bytes(b"damaged")
    logs.clear()
    build_engine(opts, log=logs.append, progress=False)
    assert any(m.startswith("weights: reading") for m in logs), logs
    assert digests(out) == first
