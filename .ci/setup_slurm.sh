#!/usr/bin/env bash
# Install the Debian SLURM daemons and munge when they are missing (idempotent, non-interactive).
# Usage: .ci/setup_slurm.sh   (as root, or with passwordless sudo)
set -euo pipefail

need=()
for bin in slurmctld slurmd sbatch srun munged; do
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
    echo "setup_slurm: slurm-wlm and munge already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup_slurm: need root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup_slurm: missing ${need[*]}; installing slurm-wlm munge"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "setup_slurm: installed $(slurmctld -V)"
