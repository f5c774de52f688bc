# Sourced (bash): `source .carry/triton/env.sh` (copied there by make_triton_bundle.sh).
# Unpacks the bundle's triton.tar.xz once into $SAWTRT_TRITON_HOME (default /tmp/sawtrt-triton;
# redone when the archive changes) and exports
#   SAWTRT_TRITONSERVER      the tritonserver binary sawtrt starts (sawtrt/serving/server.py)
#   SAWTRT_TRITON_STUB_PATH  numpy 1.26 for this Python, first on the Python backend stub's sys.path
#   PYTHONPATH               + the gRPC client packages (tritonclient, grpcio, protobuf, ...);
#                            + numpy 1.26 only if this Python has no numpy of its own
# Python: $SAWTRT_PYTHON or python3 (the interpreter that will run sawtrt).
_sawtrt_bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_sawtrt_home=${SAWTRT_TRITON_HOME:-/tmp/sawtrt-triton}
_sawtrt_py=${SAWTRT_PYTHON:-python3}
_sawtrt_sum=$(cut -d' ' -f1 "$_sawtrt_bundle/triton.tar.xz.sha256")
if [ "$(cat "$_sawtrt_home/.bundle-sha256" 2>/dev/null)" != "$_sawtrt_sum" ]; then
  rm -rf "$_sawtrt_home" && mkdir -p "$_sawtrt_home"
  if command -v xz > /dev/null; then
    tar -C "$_sawtrt_home" -xJf "$_sawtrt_bundle/triton.tar.xz"
  else
    "$_sawtrt_py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$_sawtrt_bundle/triton.tar.xz" "$_sawtrt_home"
  fi && echo "$_sawtrt_sum" > "$_sawtrt_home/.bundle-sha256" \
    && echo "triton bundle unpacked into $_sawtrt_home" >&2
fi
_sawtrt_pyv=$("$_sawtrt_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ ! -d "$_sawtrt_home/site-$_sawtrt_pyv" ]; then
  echo "triton bundle: nothing for Python $_sawtrt_pyv in $_sawtrt_home" \
       "($(cat "$_sawtrt_home/BUNDLE.txt" 2>/dev/null | grep stubs))" >&2
fi
export SAWTRT_TRITONSERVER=$_sawtrt_home/pytriton/tritonserver/bin/tritonserver
export SAWTRT_TRITON_STUB_PATH=$_sawtrt_home/numpy1-$_sawtrt_pyv
PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$_sawtrt_home/site-$_sawtrt_pyv
if ! "$_sawtrt_py" -c 'import numpy' 2> /dev/null; then
  PYTHONPATH=$PYTHONPATH:$_sawtrt_home/numpy1-$_sawtrt_pyv
fi
export PYTHONPATH
unset _sawtrt_bundle _sawtrt_home _sawtrt_py _sawtrt_sum _sawtrt_pyv
