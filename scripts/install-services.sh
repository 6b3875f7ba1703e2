#!/bin/sh
# Installs what the integration tests start themselves, from Debian packages: Slurm (slurm-wlm)
# and munge; iptables (network partitions between namespaces); etcd (a rendezvous server that
# outlives every training node). Nothing is started here: the tests start and stop each one.
# Where the packages cannot be installed (not root, no apt), the tests that need them are skipped
# and say why.
set -u
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
missing=""
{ have slurmctld && have slurmd && have sbatch; } || missing="$missing slurm-wlm"
have munged || missing="$missing munge"
have iptables || missing="$missing iptables"
have etcd || missing="$missing etcd-server"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-services: cannot install$missing here (needs root and apt-get); the tests that need them will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-services: installing$missing (Debian packages)" >&2
# shellcheck disable=SC2086 # one word per package
apt-get install -y -q $missing >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $missing >/dev/null; } \
    || echo "install-services: apt-get failed; the tests that need$missing will be skipped" >&2
exit 0
