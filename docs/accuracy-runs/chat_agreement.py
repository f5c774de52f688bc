"""Greedy chat answers under KV policies vs bf16 (served path, CPU).

    python docs/accuracy-runs/chat_agreement.py ENGINE_DIR TOKENS "bf16;int4-bdr:h=64;..." OUT.json

ENGINE_DIR: an engine built with a policy whose calibration serves every listed policy (e.g.
`sawtrt build --model smollm2-135m --kv-cache int4-bdr:h=64,kv,center,whiten --no-kernels`);
the first policy is the reference. Prints, per policy, how many answers equal the reference's
over TOKENS greedy tokens and the first differing position of each.
"""
import json, sys, torch
from sawtrt.engine.llm_engine import LLMEngine
from sawtrt.engine.sampling import SamplingParams
torch.set_num_threads(1)
PROMPTS = ["What is the capital of France?", "Name three primary colors.",
           "Write a haiku about the sea.", "How many legs does a spider have?",
           "What is 12 times 7?", "Give me a synonym for happy.",
           "Who wrote Romeo and Juliet?", "Explain what a CPU does in one sentence.",
           "What is the boiling point of water in Celsius?", "Translate 'good morning' into Spanish.",
           "List two benefits of exercise.", "What color is the sky on a clear day?"]
N = int(sys.argv[2]); out = {}
for pol in sys.argv[3].split(";"):
    eng = LLMEngine.from_engine_dir(sys.argv[1], device="cpu", kv_policy=pol)
    for i, p in enumerate(PROMPTS):
        eng.add_request(str(i), eng.tokenizer.apply_chat_template(p), SamplingParams(max_tokens=N, temperature=0, ignore_eos=True))
    toks = {}
    while eng.has_unfinished():
        for o in eng.step():
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
    out[pol] = [toks[str(i)] for i in range(len(PROMPTS))]
    ref = out[next(iter(out))]
    fd = [next((j for j, (a, b) in enumerate(zip(r, t)) if a != b), N) for r, t in zip(ref, out[pol])]
    print(f"{pol:<45} identical {sum(f == N for f in fd)}/{len(fd)}  mean first divergence {sum(fd)/len(fd):.1f}  {fd}", flush=True)
    print("   ", repr(eng.tokenizer.decode(out[pol][0])[:80]), flush=True)
json.dump(out, open(sys.argv[4], "w"))
