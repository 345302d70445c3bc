#!/usr/bin/env bash
# Submit a Relay training run to a running Ray cluster with `ray job submit`.
#
#   deploy/job_submit.sh [CONFIG] [extra `relay train` arguments...]
#
# RAY_ADDRESS  the cluster's dashboard/job API (default http://127.0.0.1:8265)
# RAY_AUTH_MODE  token (default): Ray 2.60's `ray start --head` turns on token authentication and
#   writes the token to ~/.ray/auth_token; `ray job submit` needs RAY_AUTH_MODE=token to send it.
#   From another machine also set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the head's token.
set -euo pipefail

config=${1:-cluster/gpu.yaml}
shift || true
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}

# The working directory is uploaded to the cluster: keep virtualenvs, runs and git history out.
exec ray job submit \
  --address "$RAY_ADDRESS" \
  --working-dir "$repo" \
  --runtime-env-json '{"excludes": [".venv", ".git", "runs", "**/__pycache__", "*.pt", "*.safetensors"]}' \
  -- relay train --config "$config" "$@"
