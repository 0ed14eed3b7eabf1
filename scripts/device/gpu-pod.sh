#!/bin/sh
# Record what `deskgpu doctor --gpu-pod` sees on a real GPU box, to replace the hand-built
# answers in tests/fixtures/gpu_pod/ (their README says which are by hand) with recorded ones.
#
# Run on the box, as root (doctor then reads k3s's kubeconfig and sees everything):
#   sudo sh scripts/device/gpu-pod.sh [OUT_DIR]
# It starts one 1-GPU pod (deleted again on every path) and writes into OUT_DIR (default
# ./gpu-pod-record-<host>-<UTC time>):
#   facts.json   `deskgpu doctor --gpu-pod --record`: every kubectl answer, the manifest sent,
#                nvidia-smi's output in the pod (`.gpu_pod`); replay: `deskgpu doctor --facts`
#   report.json  the same run's `--json` report (exit 3 only means some check failed)
#   host.txt     what the box is: kubectl/k3s versions, `nvidia-smi -L` on the host
# Nothing else on the box is changed. DESKGPU names the deskgpu to run (default: on PATH).
set -eu

deskgpu="${DESKGPU:-deskgpu}"
out="${1:-gpu-pod-record-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ)}"
if [ "$(id -u)" -ne 0 ]; then
    echo "gpu-pod.sh: run it as root: sudo sh $0" >&2
    exit 1
fi
mkdir -p "$out"

status=0
"$deskgpu" doctor --gpu-pod --record "$out/facts.json" --json >"$out/report.json" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 3 ]; then
    echo "gpu-pod.sh: deskgpu doctor exited $status (see above)" >&2
    exit "$status"
fi

kubectl="kubectl"
command -v kubectl >/dev/null 2>&1 || kubectl="k3s kubectl"
export KUBECONFIG="${KUBECONFIG:-/etc/rancher/k3s/k3s.yaml}"
{
    echo "# recorded $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) by scripts/device/gpu-pod.sh"
    echo "## deskgpu"; "$deskgpu" --version 2>&1 || true
    echo "## kubectl version -o json"; $kubectl version -o json 2>&1 || true
    echo "## k3s --version"; k3s --version 2>&1 || true
    echo "## nvidia-smi -L (host)"; nvidia-smi -L 2>&1 || true
    echo "## nvidia-smi --query-gpu=driver_version --format=csv,noheader"
    nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 || true
} >"$out/host.txt"

echo "wrote $out/facts.json, $out/report.json, $out/host.txt (doctor exit $status)"
echo "the GPU pod's verdict:"
python3 -c 'import json, sys
for c in json.load(open(sys.argv[1]))["checks"]:
    if c["id"] == "kubernetes.gpu_pod":
        print(" ", c["status"], "-", c["detail"])
        if c["fix"]:
            print("  fix:", c["fix"])' "$out/report.json"
