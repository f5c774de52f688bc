import json

from click.testing import CliRunner

from sawtrt.cli import main


def test_kv_plan_json_int4_bdr_holds_3_7x_bf16_tokens():
    res = CliRunner().invoke(main, ["kv-plan", "--model", "qwen3-4b", "--memory", "80GiB",
                                    "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    rows = {r["policy"].split(":")[0]: r for r in data["policies"]}
    assert rows["bf16"]["bytes_per_token"] == 36 * 8 * 512
    assert rows["int4-bdr"]["bytes_per_token"] == 36 * 8 * 136
    assert rows["int4-bdr"]["tokens"] >= 3.7 * rows["bf16"]["tokens"]
    assert rows["int4-bdr"]["sequences"] >= rows["bf16"]["sequences"] * 3


def test_kv_plan_table_and_errors():
    runner = CliRunner()
    res = runner.invoke(main, ["kv-plan", "--model", "smollm2-135m", "--memory", "8GiB",
                               "--seq-len", "4096", "--policies", "bf16,int4-bdr:h=32"])
    assert res.exit_code == 0 and "int4-bdr:h=32" in res.output
    res = runner.invoke(main, ["kv-plan", "--model", "qwen3-4b", "--policies", "int4-bdr:h=256"])
    assert res.exit_code != 0 and "does not divide" in res.output
    res = runner.invoke(main, ["kv-plan", "--model", "qwen3-4b", "--memory", "lots"])
    assert res.exit_code != 0 and "memory size" in res.output
    res = runner.invoke(main, ["kv-plan", "--model", "gpt-5"])
    assert res.exit_code != 0


def test_kv_plan_counts_per_layer_pages():
    """SmolLM2 (30 layers, 3 KV heads, D = 64): int8 pages for layers 1, 10, 19 of the int4-bdr
    cache: 27 x 216 + 3 x 408 = 7 056 B/token (docs/accuracy.md)."""
    res = CliRunner().invoke(main, ["kv-plan", "--model", "smollm2-135m", "--memory", "1GiB",
                                    "--policies", "int4-bdr:h=64,int4-bdr:h=64,int8=1+10+19",
                                    "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["policies"]
    assert [r["bytes_per_token"] for r in rows] == [6480, 7056]
    assert rows[0]["bytes_per_token_per_kv_head"] == 72
    assert rows[1]["bytes_per_token_per_kv_head"] == 78.4
    assert rows[1]["tokens"] < rows[0]["tokens"]
    res = CliRunner().invoke(main, ["kv-plan", "--model", "smollm2-135m",
                                    "--policies", "int4:int8=30"])
    assert res.exit_code != 0 and "the model has 30 layers" in res.output
