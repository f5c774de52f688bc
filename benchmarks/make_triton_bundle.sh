#!/usr/bin/env bash
# A tritonserver (+ gRPC client packages) that runs on a machine without a package registry:
# the GPU machine (Python 3.12, manylinux x86_64). Downloads from PyPI here, prunes, packs:
#
#   bash benchmarks/make_triton_bundle.sh [PYVER...]     (default 3.12; e.g. "3.12 3.11")
#
# writes .carry/triton/ (git-ignored):
#   triton.tar.xz  the nvidia-pytriton wheel's tritonserver 2.51, its Python backend, the stubs
#                  for PYVER only, its shared libraries (without the wheel's libpython3.13), and
#                  site-<PYVER>/ (tritonclient[grpc] and what it imports) and numpy1-<PYVER>/
#                  (numpy 1.26: the Python backend stub needs numpy < 2)
#   env.sh         `source .carry/triton/env.sh`: unpacks once into $SAWTRT_TRITON_HOME
#                  (default /tmp/sawtrt-triton), exports SAWTRT_TRITONSERVER (the binary
#                  `sawtrt serve` / `sawtrt bench serve --engine` start), SAWTRT_TRITON_STUB_PATH
#                  (numpy 1.26 in front of the stub's sys.path) and PYTHONPATH (the client packages;
#                  numpy 1.26 too when this python has no numpy)
# DEST=DIR writes there instead. Idempotent: downloads are cached in .carry/triton-wheels/ (not carried); the archive is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVERS=${*:-3.12}
PYTRITON=nvidia-pytriton==0.7.0
CLIENT=(tritonclient==2.73.0 grpcio==1.85.3 protobuf==6.33.6 python-rapidjson==1.25
        ml_dtypes==0.5.4 packaging typing_extensions)
NUMPY=numpy==1.26.4
DEST=${DEST:-.carry/triton}
CACHE=.carry/triton-wheels
PY=${PYTHON:-python3}
PLAT=(--only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_35_x86_64)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
unzip_to() { "$PY" -m zipfile -e "$1" "$2"; }

mkdir -p "$CACHE/any"
"$PY" -m pip download -q --no-deps "${PLAT[@]}" --python-version 3.12 -d "$CACHE/any" "$PYTRITON"
whl=$(ls "$CACHE"/any/nvidia_pytriton-*.whl | head -1)
mkdir -p "$stage/w"
unzip_to "$whl" "$stage/w"
R=$stage/root
mkdir -p "$R/pytriton/tritonserver/bin" "$R/pytriton/tritonserver/backends/python" \
         "$R/pytriton/tritonserver/python_backend_stubs"
T=$stage/w/pytriton/tritonserver
cp -a "$T/bin/tritonserver" "$R/pytriton/tritonserver/bin/"
cp -a "$T/backends/python/libtriton_python.so" "$T/backends/python/triton_python_backend_utils.py" \
      "$R/pytriton/tritonserver/backends/python/"
cp -a "$stage/w/nvidia_pytriton.libs" "$R/"
rm -f "$R"/nvidia_pytriton.libs/libpython3*        # only PyTriton's own 3.13 interpreter uses it
for v in $PYVERS; do
  [ -f "$T/python_backend_stubs/$v/triton_python_backend_stub" ] || { echo "no stub for $v"; exit 1; }
  cp -a "$T/python_backend_stubs/$v" "$R/pytriton/tritonserver/python_backend_stubs/"
  mkdir -p "$CACHE/$v"
  "$PY" -m pip download -q --no-deps "${PLAT[@]}" --python-version "$v" -d "$CACHE/$v" \
    "${CLIENT[@]}" "$NUMPY"
  for w in "$CACHE/$v"/*.whl; do
    case $(basename "$w") in
      numpy-*) unzip_to "$w" "$R/numpy1-$v" ;;
      *) unzip_to "$w" "$R/site-$v" ;;
    esac
  done
done
# not needed at run time: tests, headers, type stubs, caches, metadata beyond the version
find "$R" -depth \( -name tests -o -name __pycache__ -o -name include -o -name '*.pyi' \
  -o -name 'rapidjson-stubs' \) -path '*site-*' -exec rm -rf {} + 2>/dev/null || true
find "$R" -depth -path '*numpy1-*' \( -name tests -o -name __pycache__ -o -name f2py \
  -o -name '*.pyi' \) -exec rm -rf {} + 2>/dev/null || true
rm -rf "$R"/numpy1-*/numpy/core/include "$R"/numpy1-*/numpy/distutils "$R"/numpy1-*/numpy/_pyinstaller \
       "$R"/site-*/tritonclient/perf_analyzer* "$R"/site-*/bin 2>/dev/null || true
chmod -R u+w "$R"
chmod +x "$R"/pytriton/tritonserver/bin/tritonserver \
         "$R"/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub  # zipfile drops modes
# debug symbols: ~40 % of the shared objects (server and extension modules alike)
if command -v strip > /dev/null; then
  find "$R" -type f -name '*.so*' -exec strip --strip-unneeded {} +
  strip --strip-unneeded "$R"/pytriton/tritonserver/bin/tritonserver "$R"/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
fi
{ echo "nvidia-pytriton: $(basename "$whl")"; echo "stubs: $PYVERS"
  echo "client: ${CLIENT[*]}"; echo "stub numpy: $NUMPY"; } > "$R/BUNDLE.txt"

mkdir -p "$DEST"
rm -f "$DEST/triton.tar.xz" "$DEST/triton.tar.xz.sha256"
tar -C "$R" -cf - . | xz -T0 -9 > "$DEST/triton.tar.xz"
(cd "$DEST" && sha256sum triton.tar.xz > triton.tar.xz.sha256)
cp benchmarks/triton_bundle_env.sh "$DEST/env.sh"
cp "$R/BUNDLE.txt" "$DEST/"
echo "unpacked: $(du -sh "$R" | cut -f1)   bundle $DEST: $(du -sh "$DEST" | cut -f1)"
