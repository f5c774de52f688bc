"""`sawtrt bench kernels` is importable and documented without a GPU."""
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
