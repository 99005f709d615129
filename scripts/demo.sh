#!/usr/bin/env bash
# The Quick start: install, generate a tiny model, declare an instance, start it on the real llama-server, show it
# running, ask it something, show its log. The demo's home is ./demo-home (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export LLAMA_ORCH_HOME="$PWD/demo-home"
orch=.venv/bin/llama-orch
mkdir -p demo-home/models
[ -f demo-home/models/tiny.gguf ] || .venv/bin/python -m llama_orchestrator.testing.tiny_gguf demo-home/models/tiny.gguf
[ -f demo-home/instances/demo/config.json ] || $orch init demo --model demo-home/models/tiny.gguf --context-size 512
$orch up demo -d --wait
$orch ps
port=$($orch ps --json | .venv/bin/python -c 'import json,sys; print(next(r["port"] for r in json.load(sys.stdin) if r["name"]=="demo"))')
echo "--- POST http://127.0.0.1:$port/v1/chat/completions"
.venv/bin/python - "$port" <<'PY'
import sys, httpx
reply = httpx.post(f"http://127.0.0.1:{sys.argv[1]}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}, timeout=60)
reply.raise_for_status()
body = reply.json()
print("model:", body["model"], "| finish:", body["choices"][0]["finish_reason"], "| tokens:", body["usage"])
PY
echo "--- llama-orch logs demo --tail 5"
$orch logs demo --tail 5
echo
echo "The demo instance keeps running. Try: LLAMA_ORCH_HOME=$LLAMA_ORCH_HOME $orch describe demo"
echo "Stop it with:                       LLAMA_ORCH_HOME=$LLAMA_ORCH_HOME $orch down demo"
