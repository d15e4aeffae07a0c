#!/usr/bin/env bash
# A local Ray head to submit jobs to, as on a cluster.
#   bash infra/local/start-ray-head.sh
#   RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m jobs.generate --output out/demo
#   ray stop
set -euo pipefail
ray start --head --dashboard-host 127.0.0.1 --num-cpus "${NUM_CPUS:-$(nproc)}"
echo "dashboard and job API at http://127.0.0.1:8265 (Ray >= 2.5x: set RAY_AUTH_MODE=token for clients)"
