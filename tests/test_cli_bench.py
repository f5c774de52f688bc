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
