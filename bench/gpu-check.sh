#!/usr/bin/env bash
# The prepared GPU check of issue 14: one script, run from the repository root on a machine with one
# NVIDIA GPU (or, to check the script itself, on the CPU with --device cpu and small sizes).
#
#   bench/gpu-check.sh [--device cuda|cpu] [--networks 1000] [--k 1,64,512,2048,4096] [--stack 4096]
#                      [--target-loss 1e-4] [--budget 480]
#
# What such a machine has (DESIGN.md §6): Python 3.12, torch with CUDA, numpy, safetensors, aiohttp,
# pyarrow, scikit-learn, click, rich, prometheus-client; no pydantic and no network. So the project is
# used from this checkout (PYTHONPATH, nothing to build) and pydantic/pydantic-core are installed from
# wheels carried in shared/wheels (or $MLDS_WHEELS) with --no-deps --no-index. Every figure is printed.
#
# Steps: (1) the batched-vs-alone agreement on the device (continuous stack against train_unit:
# same verdict and epochs, losses close; on the CPU bit-identical), (2) `mlds bench train --device`
# up to the knee, (3) `mlds run` of a ds1 campaign on the device, timed, with its summary (networks,
# wall, stack occupancy), and networks/hour with the projection for 50,000 ds1 networks.
set -euo pipefail

DEVICE=cuda NETWORKS=1000 KS=1,64,512,2048,4096 STACK=4096 TARGET_LOSS=1e-4 BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --networks) NETWORKS=$2; shift 2 ;;
    --k) KS=$2; shift 2 ;;
    --stack) STACK=$2; shift 2 ;;
    --target-loss) TARGET_LOSS=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT/contract:$ROOT/worker:$ROOT/operator:$ROOT/data:$ROOT/cli:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-python3}
WHEELS=${MLDS_WHEELS:-$ROOT/shared/wheels}
WORK=$(mktemp -d /tmp/mlds-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "== mlds gpu-check: device=$DEVICE networks=$NETWORKS k=$KS stack=$STACK target-loss=$TARGET_LOSS"
date -u +%FT%TZ
cat /proc/loadavg 2>/dev/null || true
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

echo "== 1. install what is missing (no network)"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  ls "$WHEELS"/pydantic*.whl >/dev/null 2>&1 || { echo "pydantic missing and no wheels in $WHEELS" >&2; exit 3; }
  "$PY" -m pip install --quiet --no-deps --no-index "$WHEELS"/pydantic_core-*.whl "$WHEELS"/pydantic-*.whl \
    "$WHEELS"/typing_inspection-*.whl "$WHEELS"/annotated_types-*.whl 2>/dev/null \
    || "$PY" -m pip install --quiet --no-deps --no-index "$WHEELS"/*.whl
fi
for mod in torch numpy pydantic aiohttp click rich yaml safetensors pyarrow sklearn prometheus_client; do
  "$PY" -c "import $mod" 2>/dev/null || echo "missing module: $mod (the steps that need it will fail)"
done
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

echo "== 2. agreement: a continuous stack against each unit trained alone, on $DEVICE"
"$PY" - "$DEVICE" <<'PYEOF'
import sys, time, torch
from mlds_contract.campaign import CampaignSpec, Dataset, Training, Workload
from mlds_contract.plan import campaign_targets, unit_spec
from mlds_worker.stack import ContinuousStack
from mlds_worker.train import train_unit
device = sys.argv[1]
machines = ["SingleDirectMachine", "SingleInvertMachine", "SimpleXORMachine", "ParityMachine"]
spec = CampaignSpec(workload=Workload(dataset=Dataset.ds1, machines=machines), networks_per_target=3, seed=5,
                    training=Training(max_epochs=6, target_loss=1e-30))
targets = campaign_targets(spec)
units = [unit_spec(spec, u, targets=targets) for u in range(12)]
units = [u.model_copy(update={"training": u.training.model_copy(update={"max_epochs": 2 + i % 5})}) for i, u in enumerate(units)]
stack = ContinuousStack(device)
queue, done = list(units), {}
t = time.perf_counter()
while queue or len(stack):
    while queue and len(stack) < 4:
        u = queue.pop(0); stack.add(u.unit, u)
    for f in stack.round():
        done[f.key] = f.result
stacked_s = time.perf_counter() - t
worst, exact = 0.0, 0
for u in units:
    alone = train_unit(u, device=device)
    got = done[u.unit]
    assert (got.epochs, got.converged) == (alone.epochs, alone.converged), (u.unit, got.epochs, alone.epochs)
    rel = max(abs(a.eval_loss - b.eval_loss) / max(abs(b.eval_loss), 1e-12) for a, b in zip(got.history, alone.history))
    worst = max(worst, rel)
    exact += all(torch.equal(got.state_dict[k], alone.state_dict[k]) for k in alone.state_dict)
print(f"agreement: {len(units)} units (members joining mid-way, stack of 4): same epochs and verdicts; "
      f"worst relative eval-loss difference {worst:.2e}; bit-identical {exact}/{len(units)}; stack {stacked_s:.1f} s")
assert worst < 1e-3, "stacked and alone disagree beyond rounding"
PYEOF

echo "== 3. mlds bench train --device $DEVICE --k $KS"
cat /proc/loadavg 2>/dev/null || true
"$PY" -m mlds_cli bench train --device "$DEVICE" --epochs 2 --rounds 1 --baseline-networks 1 --k "$KS"

echo "== 4. mlds run: $NETWORKS ds1 networks on $DEVICE (budget ${BUDGET}s)"
ACCEL=cpu; [ "$DEVICE" = "cpu" ] || ACCEL=nvidia
PER=$(( NETWORKS / 5 )); [ "$PER" -ge 1 ] || PER=1
cat > "$WORK/campaign.yaml" <<YAML
apiVersion: mlds.dev/v1alpha1
kind: TrainingCampaign
metadata: {name: gpu-check}
spec:
  workload: {dataset: ds1}
  networksPerTarget: $PER
  seed: 11
  training: {targetLoss: $TARGET_LOSS}
  pools: [{name: local, accelerator: $ACCEL, unitsPerLease: $STACK}]
YAML
cat /proc/loadavg 2>/dev/null || true
START=$(date +%s.%N)
timeout "$BUDGET" "$PY" -m mlds_cli run "$WORK/campaign.yaml" --workers 1 --store "$WORK/store" --quiet || echo "run ended with status $?"
END=$(date +%s.%N)
"$PY" - "$START" "$END" "$(( PER * 5 ))" "$WORK/store" <<'PYEOF'
import sys, pathlib
start, end, n, store = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
done = len(list(store.glob("*/*/meta.json")))
wall = end - start
rate = done / wall * 3600 if wall > 0 else 0.0
print(f"run: {done}/{n} networks in {wall:,.1f} s -> {rate:,.0f} networks/h on one device; "
      f"50,000 ds1 networks: {50000 / rate if rate else float('inf'):,.2f} h at this rate")
PYEOF
cat /proc/loadavg 2>/dev/null || true
echo "== done"
