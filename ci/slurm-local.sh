#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the @pytest.mark.slurm tests.
#
#   ci/slurm-local.sh install        apt-get slurm-wlm and munge (root; skipped when present)
#   ci/slurm-local.sh start DIR      write DIR/slurm.conf (this host, 127.0.0.1 ports, no cgroups,
#                                    proctrack/linuxproc), start munged, slurmctld and slurmd;
#                                    prints the SLURM_CONF to export
#   ci/slurm-local.sh stop DIR       stop the daemons started from DIR
#
# Checked by hand on Debian 12 (slurm-wlm 22.05): sbatch runs a job within seconds.
set -euo pipefail

cmd=${1:?usage: $0 install|start DIR|stop DIR}

case "$cmd" in
install)
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "slurm-local: not root or no apt-get; SLURM tests will be skipped" >&2
        exit 0
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    ;;
start)
    dir=$(realpath -m "${2:?usage: $0 start DIR}")
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    port=${SLURM_LOCAL_PORT:-6917}
    cat >"$dir/slurm.conf" <<CONF
ClusterName=featstore
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    [ -s /etc/munge/munge.key ] || su -s /bin/sh munge -c "/usr/sbin/mungekey --create" 2>/dev/null || true
    pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld
    slurmd
    for _ in $(seq 60); do
        if sinfo -h -o %t 2>/dev/null | grep -q idle; then echo "SLURM_CONF=$SLURM_CONF"; exit 0; fi
        sleep 0.5
    done
    echo "slurm-local: the node did not come up; see $dir/log" >&2
    exit 1
    ;;
stop)
    dir=$(realpath -m "${2:?usage: $0 stop DIR}")
    pids=()
    for d in slurmd slurmctld; do
        if [ -f "$dir/$d.pid" ]; then pids+=("$(cat "$dir/$d.pid")"); fi
    done
    [ ${#pids[@]} -eq 0 ] && exit 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 40); do  # wait until they are gone (they save state first)
        kill -0 "${pids[@]}" 2>/dev/null || exit 0
        sleep 0.25
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 install|start DIR|stop DIR" >&2
    exit 2
    ;;
esac
