#!/usr/bin/env bash
# device-daemon-gpu-check.sh: check snakepitd's GPU pinning on a machine with
# real NVIDIA GPUs. It starts bin/snakepitd with a pool of one worker per GPU
# (gpus.per_worker: 1, exclusive) beside a CPU pool, and shows, through
# bin/spctl: the node's published GPUs (spctl nodes), each worker's GPUs
# (spctl workers), and each worker process's CUDA_VISIBLE_DEVICES as the
# kernel has it (/proc/PID/environ): each GPU worker must see exactly its
# GPU's UUID, the CPU worker none. Where the workers' python3 has PyTorch,
# it also asks CUDA itself, from inside each worker, which devices it sees:
# the GPU worker exactly its GPU, the CPU worker none. Needs python3.
#
# Build the binaries first, where Go is, from the repository root:
#
#   make build
#
# Exit status: 0 when every check passes, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
tmp=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT
gpus=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | wc -l)
if [ "$gpus" -lt 1 ]; then
	echo "nvidia-smi lists no GPU" >&2
	exit 1
fi
cat >"$tmp/check.py" <<'PY'
import os

from snakepit import tool


@tool
def whoami() -> dict:
    return {"pid": os.getpid()}


@tool
def cuda() -> dict:
    """The CUDA devices this worker sees, as PyTorch reports them."""
    import torch

    n = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(n)]
    return {"count": n, "names": [p.name for p in props], "uuids": ["GPU-" + str(p.uuid) for p in props]}
PY
cat >"$tmp/snakepitd.yaml" <<YAML
node_id: gpu-check
admin_socket: $tmp/admin.sock
pools:
  - name: default
    adapter: $tmp/check.py
    size: 1
  - name: gpu
    adapter: $tmp/check.py
    size: $gpus
    gpus:
      per_worker: 1
      exclusive: true
YAML
bin/snakepitd --config "$tmp/snakepitd.yaml" --listen 127.0.0.1:0 --metrics-listen off \
	--state-dir "$tmp/state" --listen-file "$tmp/addr" 2>"$tmp/log" &
pid=$!
for _ in $(seq 600); do [ -s "$tmp/addr" ] && break; sleep 0.1; done
addr=$(cat "$tmp/addr" 2>/dev/null)
if [ -z "$addr" ]; then
	echo "snakepitd did not start:" >&2
	cat "$tmp/log" >&2
	exit 1
fi
ctl() { bin/spctl --addr "$addr" "$@"; }
admin() { bin/spctl --admin-socket "$tmp/admin.sock" "$@"; }
for _ in $(seq 300); do [ "$(ctl status -o json 2>/dev/null | grep -c POOL_STATE_READY)" -eq 2 ] && break; sleep 0.1; done
echo "== snakepitd log (hardware lines)"
grep -E 'hardware|gpu assigned' "$tmp/log"
echo "== spctl nodes"
ctl nodes
echo "== spctl workers"
admin workers
echo "== spctl exec --pool gpu whoami"
ctl exec --pool gpu whoami
echo "== CUDA_VISIBLE_DEVICES per worker process"
ok=0
while read -r pool wpid want; do
	got=$(tr '\0' '\n' <"/proc/$wpid/environ" | sed -n 's/^CUDA_VISIBLE_DEVICES=//p')
	echo "$pool pid $wpid: CUDA_VISIBLE_DEVICES='$got' (assigned '$want')"
	[ "$got" = "$want" ] || ok=1
done < <(admin workers -o json | python3 -c '
import json, sys
for w in json.load(sys.stdin).get("workers", []):
    print(w["pool"], w["worker"]["pid"], ",".join(w["worker"].get("gpu_uuids", [])))
')
if python3 -c 'import torch' 2>/dev/null; then
	for pool in default gpu; do
		echo "== CUDA as PyTorch sees it in pool $pool (spctl exec --pool $pool cuda)"
		ctl --timeout 120s exec -o json --pool "$pool" cuda | tee "$tmp/cuda-$pool.json"
	done
	python3 - "$tmp" <<'PY' || ok=1
import json, subprocess, sys
tmp = sys.argv[1]
def result(pool):
    out = json.load(open(f"{tmp}/cuda-{pool}.json"))
    return out.get("result", out)
cpu, gpu = result("default"), result("gpu")
uuids = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True).stdout.split()
print(f"cpu worker sees {cpu['count']} devices; gpu worker sees {gpu['uuids']}; host has {uuids}")
assert cpu["count"] == 0, "the CPU pool's worker sees a GPU"
assert gpu["count"] == 1 and gpu["uuids"][0] in uuids, "the GPU worker does not see exactly one of the host's GPUs"
PY
else
	echo "== no PyTorch for python3: CUDA's own view not checked"
fi
if [ "$ok" -eq 0 ]; then echo "== device-daemon-gpu-check: PASS"; else echo "== device-daemon-gpu-check: FAIL"; fi
exit "$ok"
