#!/usr/bin/env bash
# Build the environments of the benchmark's peer loaders (benchmarks/bench_peers.py).
#
#  * WebDataset goes into the project's .venv: it installs cleanly beside the CPU torch.
#  * MosaicML Streaming wants numpy<2.2 and torchvision, which pull torch 2.14.1 (a CUDA
#    build): it gets its own venv, .venv-peers (git-ignored), together with LitData and
#    shardset itself (so the benchmark's subprocess there can use shardset.bench), and
#    the benchmark drives it by subprocess. Set PEERS_VENV to put it elsewhere.
#
# Neither is needed by the tests: tests/test_benchmarks.py skips a peer that is missing
# and says why. Safe to rerun; a step that fails is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
PEERS_VENV=${PEERS_VENV:-.venv-peers}
export PIP_DISABLE_PIP_VERSION_CHECK=1
status=0

echo "== webdataset into .venv"
.venv/bin/python -m pip install -q webdataset || { echo "webdataset: install failed"; status=1; }

echo "== $PEERS_VENV: torch 2.14.1 + torchvision 0.29.1 + mosaicml-streaming"
[ -x "$PEERS_VENV/bin/python" ] || "$PYTHON" -m venv "$PEERS_VENV"
"$PEERS_VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" mosaicml-streaming psutil -e . \
  || { echo "mosaicml-streaming: install failed"; status=1; }

echo "== $PEERS_VENV: litdata"
"$PEERS_VENV/bin/python" -m pip install -q litdata || { echo "litdata: install failed"; status=1; }

"$PEERS_VENV/bin/python" - <<'PY'
import importlib
for m in ("torch", "numpy", "streaming", "litdata", "shardset"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"{m}: NOT importable: {type(exc).__name__}: {exc}")
PY
exit $status
