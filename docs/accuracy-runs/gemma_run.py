"""`python docs/accuracy-runs/gemma_run.py POLICIES OUT.json` (2026-11-29). Driver: sawtrt.eval.api.evaluate on gemma3-270m with the calibration windows fitted to
Gemma's 512-token sliding window (2 x (511 + BOS) = 1022 calib tokens instead of 2 x (512 + BOS),
which KVHook refuses on the local layers). Nothing else changed. Rows are appended to a .jsonl
as they finish."""
import functools, json, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))   # the checkout
import sawtrt.eval.api as api
from sawtrt.eval.calibrate import calibrate as _cal

def calibrate(model, tok, label, block, tokens=1022, window=511, refresh=False):
    return _cal(model, tok, label, block, tokens=tokens, window=window, refresh=refresh)

api.calibrate = calibrate
policies, out = sys.argv[1], sys.argv[2]
from sawtrt.eval.kvquant import split_schemes

def on_row(r):
    with open(out + "l", "a") as f:
        f.write(json.dumps(r) + "\n")

res = api.evaluate("gemma3-270m", None, split_schemes(policies), 1022, 511, greedy_tokens=0,
                   outliers=False, log=lambda s: print(s, file=sys.stderr, flush=True), on_row=on_row)
res["note"] = ("calibration: 'calib' text, 1022 tokens in 2 windows of 511 + BOS (Gemma's "
               "sliding window); driver docs/accuracy-runs/gemma_run.py around sawtrt.eval.api.evaluate")
print(api.format_table(res))
api.save_json(res, out)
