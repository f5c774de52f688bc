"""Seconds-long check that tritonserver and its Python backend stub work with this interpreter,
before a long engine load: starts the server sawtrt would start (sawtrt.serving.server, so
$SAWTRT_TRITONSERVER / $SAWTRT_TRITON_STUB_PATH apply) on a toy model, asks it over gRPC what
the stub imports, and prints that.

    python3 benchmarks/triton_selfcheck.py [--log FILE] [--need torch]

Exit code 0: the stub imported numpy (< 2), sawtrt and every --need module.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

MODEL_PY = '''
import json, sys
import numpy as np
import triton_python_backend_utils as pb_utils


def _probe():
    info = {"python": sys.version.split()[0], "prefix": sys.prefix, "executable": sys.executable}
    for name in ["numpy", "sawtrt.serving.backend"] + NEED:
        try:
            m = __import__(name, fromlist=["_"])
            info[name] = [getattr(m, "__version__", ""), getattr(m, "__file__", "")]
        except Exception as e:
            info[name] = ["ERROR", f"{type(e).__name__}: {e}"]
    return info


class TritonPythonModel:
    def execute(self, requests):
        out = np.array([json.dumps(_probe()).encode()], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]) for _ in requests]
'''

CONFIG = '''name: "selfcheck"
backend: "python"
max_batch_size: 0
input { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] }
output { name: "OUT" data_type: TYPE_STRING dims: [ 1 ] }
instance_group [ { count: 1, kind: KIND_CPU } ]
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log", default=None, help="server log file [default: discarded]")
    ap.add_argument("--need", action="append", default=[], help="module the stub must import")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import numpy as np
    import tritonclient.grpc as grpcclient

    from sawtrt.serving.server import TritonServer, find_tritonserver
    print(f"tritonserver: {find_tritonserver()}")
    with tempfile.TemporaryDirectory(prefix="sawtrt-selfcheck-") as tmp:
        model = Path(tmp) / "selfcheck"
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text(CONFIG)
        (model / "1" / "model.py").write_text(f"NEED = {a.need!r}\n" + MODEL_PY)
        with TritonServer(Path(tmp), log_file=a.log) as server:
            server.wait_ready(a.timeout, model="selfcheck")
            client = grpcclient.InferenceServerClient(server.grpc_url)
            x = grpcclient.InferInput("IN", [1], "INT32")
            x.set_data_from_numpy(np.zeros(1, dtype=np.int32))
            info = json.loads(client.infer("selfcheck", [x]).as_numpy("OUT")[0])
            client.close()
    print(json.dumps(info, indent=1))
    bad = [k for k, v in info.items() if isinstance(v, list) and v[0] == "ERROR"]
    if info["numpy"][0] and not bad and int(info["numpy"][0].split(".")[0]) >= 2:
        bad.append("numpy >= 2 in the stub (set $SAWTRT_TRITON_STUB_PATH to a numpy 1.26)")
    print("selfcheck:", "FAILED " + ", ".join(bad) if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
