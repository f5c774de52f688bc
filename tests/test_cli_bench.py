"""`sawtrt bench`: kernels and serve are importable without a GPU; throughput runs on CPU."""
import pytest
from click.testing import CliRunner

from sawtrt.cli import main


def test_bench_kernels_help():
    result = CliRunner().invoke(main, ["bench", "kernels", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--json", "--shapes", "--batches", "--contexts", "--reps"):
        assert option in result.output


def test_bench_kernels_rejects_unknown_shape():
    result = CliRunner().invoke(main, ["bench", "kernels", "--shapes", "nope"])
    assert result.exit_code != 0
    assert "unknown shapes" in result.output


def test_bench_lists_are_checked_before_running():
    for args, needle in ((["kernels", "--batches", "1,x"], "batches: expected comma-separated"),
                         (["kernels", "--contexts", "0,1024"], "contexts must be >= 1"),
                         (["serve", "--url", "127.0.0.1:1", "--concurrency", "4,-1"],
                          "concurrency levels must be >= 1")):
        result = CliRunner().invoke(main, ["bench", *args])
        assert result.exit_code == 2 and needle in result.output, result.output


def test_bench_serve_without_tritonserver_is_a_clear_error(tmp_path, monkeypatch):
    from sawtrt.serving import server as srv

    def missing():
        raise srv.TritonNotFound("no tritonserver here")
    monkeypatch.setattr(srv, "find_tritonserver", missing)
    result = CliRunner().invoke(main, ["bench", "serve", "--engine", str(tmp_path)])
    assert result.exit_code == 1 and "Error: no tritonserver here" in result.output, result.output


def test_bench_throughput_and_plot(tmp_path):
    """The engine-only throughput bench on a tiny CPU engine: every request completes with its
    output length, the latencies are ordered, pages come back, and records of two runs merge
    into one table, JSON and PNG (levels of one policy joined)."""
    import json

    from runtime_helpers import build_tiny, tiny_spec
    eng = build_tiny(tmp_path, tiny_spec("qwen3"), kv_cache="int4-bdr", max_seq_len=64,
                     max_batch=4)
    outs = []
    for conc, pols in (("1,2", "bf16,int4-bdr"), ("3", "int4-bdr")):
        out = tmp_path / f"tp{conc}.json"
        r = CliRunner().invoke(main, ["bench", "throughput", "--engine", str(eng), "--policies",
                                      pols, "--concurrency", conc, "--num-requests", "3",
                                      "--prompt-len", "20", "--output-len", "5",
                                      "--kv-memory-gib", "0.01", "--json", str(out)])
        assert r.exit_code == 0, r.output
        outs.append(str(out))
    rec = json.loads(open(outs[0]).read())
    assert [run["policy_arg"] for run in rec["runs"]] == ["bf16", "int4-bdr"]
    for run in rec["runs"]:
        for lv in run["levels"]:
            assert lv["output_tokens"] == 3 * 5
            assert 0 < lv["ttft_s"]["p50"] <= lv["latency_s"]["p50"] <= lv["wall_s"]
            assert lv["kv"]["peak_running"] == lv["concurrency"]
            assert lv["steps"]["mixed_tokens"] >= 3 * 20 and lv["steps"]["decode"] > 0
            assert lv["output_tok_s"] == pytest.approx(15 / lv["wall_s"])
            # the roofline of the level beside it; a CPU step is far from its limit
            assert lv["roofline"]["tok_s"] > 0 and lv["roofline"]["batch"] == lv["concurrency"]
            assert 0 < lv["roofline_fraction"] < 1
            assert lv["roofline_fraction"] == pytest.approx(
                lv["output_tok_s"] / lv["roofline"]["tok_s"])
    assert rec["hardware"]["copy_tbps"] > 0 and rec["hardware"]["copy_source"] == "measured"
    merged, png = tmp_path / "all.json", tmp_path / "all.png"
    r = CliRunner().invoke(main, ["bench", "plot-throughput", *outs, "--json", str(merged),
                                  "--plot", str(png)])
    assert r.exit_code == 0, r.output
    m = json.loads(merged.read_text())
    levels = {run["policy_arg"]: [lv["concurrency"] for lv in run["levels"]] for run in m["runs"]}
    assert levels == {"bf16": [1, 2], "int4-bdr": [1, 2, 3]}
    assert "roof tok/s" in r.output and "%roof" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_throughput_compares_scheduling_modes(tmp_path):
    """`--scheduling async,sync`: one engine per mode in one process, labelled; both complete
    every request; the device idle time before decode steps is reported (CPU: host marks)."""
    import json

    from runtime_helpers import build_tiny, tiny_spec
    eng = build_tiny(tmp_path, tiny_spec("qwen3"), kv_cache="int4-bdr", max_seq_len=64,
                     max_batch=4)
    out = tmp_path / "tp.json"
    r = CliRunner().invoke(main, ["bench", "throughput", "--engine", str(eng), "--policies",
                                  "int4-bdr", "--concurrency", "2", "--num-requests", "4",
                                  "--prompt-len", "12", "--output-len", "6", "--kv-memory-gib",
                                  "0.01", "--scheduling", "async,sync", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert [(run["label"], run["async_scheduling"]) for run in rec["runs"]] == \
        [("int4-bdr async", True), ("int4-bdr sync", False)]
    for run in rec["runs"]:
        (lv,) = run["levels"]
        assert lv["output_tokens"] == 4 * 6
        s = lv["steps"]
        assert s["decode"] > 0 and s["gpu_idle_ms_p50"] >= 0 and 0 <= s["gpu_idle_fraction"] < 1
    assert "int4-bdr async" in r.output and "idle ms" in r.output
    r = CliRunner().invoke(main, ["bench", "throughput", "--engine", str(eng), "--scheduling",
                                  "fast"])
    assert r.exit_code != 0 and "--scheduling" in r.output
