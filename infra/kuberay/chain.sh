#!/usr/bin/env bash
# The cluster jobs in order, each started when the one before has succeeded: curation (both corpora) -> training
# stage 1 -> training stage 2 (from stage 1's export). Paths between them: infra/cluster_paths.yaml.
#   infra/kuberay/chain.sh            # from the repository root, with kubectl pointing at the cluster
# A failed job stops the chain; delete that RayJob and run the script again: finished jobs are skipped and every
# job resumes its own output (see each manifest).
set -euo pipefail
cd "$(dirname "$0")"
JOBS=(rayjob-curate.yaml rayjob-train-stage1.yaml rayjob-train-stage2.yaml)

for manifest in "${JOBS[@]}"; do
  name=$(kubectl create --dry-run=client -o jsonpath='{.metadata.name}' -f "$manifest")
  status=$(kubectl get rayjob "$name" -o jsonpath='{.status.jobStatus}' 2>/dev/null || true)
  if [[ "$status" == SUCCEEDED ]]; then
    echo "$name: succeeded before, skipped"
    continue
  fi
  echo "$name: starting"
  kubectl apply -f "$manifest"
  until status=$(kubectl get rayjob "$name" -o jsonpath='{.status.jobStatus}') && [[ "$status" =~ ^(SUCCEEDED|FAILED|STOPPED)$ ]]; do
    sleep 60
  done
  echo "$name: $status"
  [[ "$status" == SUCCEEDED ]] || exit 1
done
