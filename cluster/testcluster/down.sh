#!/usr/bin/env bash
# Stop the local SLURM test cluster started by up.sh (packages, config and accounting data stay).
#
#   sudo cluster/testcluster/down.sh            cancel jobs, stop slurmd x4, slurmctld, slurmdbd, MariaDB, munged
#   sudo cluster/testcluster/down.sh --purge    also delete controller state, spool and logs: the next up.sh
#                                                starts job ids at 1 and clears old job records from accounting
#
# Exit status 3: not root.
set -euo pipefail

TC_DIR=/var/lib/nyaflow-testcluster     # must match up.sh
NODES=(n1 n2 n3 n4)
RUN_DIR=$TC_DIR/run

log() { printf '[testcluster] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    echo "[testcluster] down.sh must run as root: sudo $0" >&2
    exit 3
fi
purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

# proc_gone PID: no such process, or only a zombie (killed daemons stay zombies here for a second or two
# until PID 1 reaps them, with their name still in /proc)
proc_gone() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    st=${st##*) }
    [[ ${st%% *} == [ZX] ]]
}

pid_of() {  # pid_of PIDFILE NAME: print the pid if it runs a process named NAME*
    local pid comm
    [[ -s $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    proc_gone "$pid" && return 1
    [[ $comm == "$2"* ]] || return 1
    echo "$pid"
}

stop() {  # stop PIDFILE NAME [SECONDS]: TERM, wait up to SECONDS (10), then KILL
    local pid i wait_s=${3:-10}
    if pid=$(pid_of "$1" "$2"); then
        log "stopping $2 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < wait_s * 10; i++)); do
            proc_gone "$pid" && break
            sleep 0.1
        done
        if ! proc_gone "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$1"
}

# Cancel jobs first, so that no job steps outlive their slurmd.
if pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null && scontrol ping >/dev/null 2>&1; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: ${jobs//$'\n'/ }"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do
            [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
fi

for n in "${NODES[@]}"; do stop "$RUN_DIR/slurmd-$n.pid" slurmd; done
stop "$RUN_DIR/slurmctld.pid" slurmctld
stop "$RUN_DIR/slurmdbd.pid" slurmdbd

stop /run/mysqld/mysqld.pid mariadbd 60   # SIGTERM is a clean shutdown for MariaDB
stop /run/munge/munged.pid munged

if ((purge)); then
    log "purging controller state, spool and logs under $TC_DIR"
    rm -rf "${TC_DIR:?}/state" "${TC_DIR:?}/spool" "${TC_DIR:?}/log" "${TC_DIR:?}/run"
fi
log "test cluster stopped"
