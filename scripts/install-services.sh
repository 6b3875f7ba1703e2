#!/bin/sh
# Installs what the integration tests start themselves: Slurm (slurm-wlm) and munge, from Debian
# packages. Nothing is started here; tests/slurm_cluster.py starts and stops the daemons.
# Where the packages cannot be installed (not root, no apt), the Slurm test is skipped and says why.
set -u
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have slurmctld && have slurmd && have munged && have sbatch; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-services: cannot install slurm-wlm/munge here (needs root and apt-get); the Slurm test will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-services: installing slurm-wlm and munge (Debian packages)" >&2
apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null; } \
    || echo "install-services: apt-get failed; the Slurm test will be skipped" >&2
exit 0
