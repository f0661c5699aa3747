#!/usr/bin/env bash
# Bring up a real local SLURM test cluster on this one machine (Debian 12, Slurm 22.05), idempotently.
#
#   sudo cluster/testcluster/up.sh
#
# 4 emulated nodes n1..n4 (8 CPUs, 4000 MB, 8 fake GPUs each) in partition "debug", accounting through
# slurmdbd + MariaDB (cluster "nyaflow", account "nyaflow", user root). No systemd needed: every daemon is
# started by hand. Running it again when everything is up does nothing and exits 0; running it after some
# daemons died restarts those. Stop with cluster/testcluster/down.sh. Exit status 3: not root.
set -euo pipefail

# ---- fixed locations and names -------------------------------------------------------------------------
TC_DIR=/var/lib/nyaflow-testcluster     # state, spool, logs, pid files, fake GPU devices
SLURM_ETC=/etc/slurm                    # Debian's client tools read /etc/slurm/slurm.conf
CLUSTER=nyaflow
ACCOUNT=nyaflow
PARTITION=debug
NODES=(n1 n2 n3 n4)
NODE_CPUS=8
NODE_MEM_MB=4000
NODE_GPUS=8
CTLD_PORT=6817
DBD_PORT=6819
NODE_PORT_BASE=6820                     # nK listens on NODE_PORT_BASE + K
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=nyaflow-testcluster             # local test cluster only: MariaDB listens on localhost
WAIT_S=${NYAFLOW_TC_WAIT_S:-90}         # how long to wait for each daemon / the nodes
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

LOG_DIR=$TC_DIR/log
RUN_DIR=$TC_DIR/run
STATE_DIR=$TC_DIR/state
SPOOL_DIR=$TC_DIR/spool
GPU_DIR=$TC_DIR/dev

log() { printf '[testcluster] %s\n' "$*" >&2; }
die() { printf '[testcluster] ERROR: %s\n' "$*" >&2; exit 1; }

if [[ $(id -u) -ne 0 ]]; then
    echo "[testcluster] up.sh must run as root (it installs packages and starts daemons): sudo $0" >&2
    exit 3
fi

T0=$SECONDS
export DEBIAN_FRONTEND=noninteractive

# One up.sh at a time (parallel test workers may all call it). Daemons get fd 9 closed (9>&-) so that
# they do not hold the lock after this script ends.
mkdir -p "$TC_DIR"
exec 9>"$TC_DIR/up.lock"
flock -w 600 9 || die "another up.sh holds $TC_DIR/up.lock"

# ---- helpers ---------------------------------------------------------------------------------------------
# proc_gone PID: no such process, or only a zombie (killed daemons stay zombies here for a second or two
# until PID 1 reaps them, with their name still in /proc)
proc_gone() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    st=${st##*) }
    [[ ${st%% *} == [ZX] ]]
}

# pid_alive PIDFILE NAME: the pid in PIDFILE runs a process whose command name starts with NAME
pid_alive() {
    local pid comm
    [[ -s $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    proc_gone "$pid" && return 1
    [[ $comm == "$2"* ]]
}

# stop_pidfile PIDFILE NAME: TERM the process, wait for it, KILL if it lingers
stop_pidfile() {
    local pid i
    pid_alive "$1" "$2" || { rm -f "$1"; return 0; }
    pid=$(tr -dc '0-9' <"$1")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        proc_gone "$pid" && break
        sleep 0.1
    done
    proc_gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND until it succeeds
wait_for() {
    local limit=$1 what=$2 end
    shift 2
    end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || return 1
        sleep 0.5
    done
    log "$what is up"
}

tails() {
    local f
    for f in "$@"; do
        [[ -f $f ]] || continue
        printf -- '---- last lines of %s ----\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
}

# install_if_changed SRC DEST MODE: returns 0 if DEST was (re)written
install_if_changed() {
    if [[ -f $2 ]] && cmp -s "$1" "$2"; then
        rm -f "$1"
        return 1
    fi
    install -m "$3" "$1" "$2"
    rm -f "$1"
    return 0
}

# ---- 1. packages -------------------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) == 'install ok installed' ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt-get update -qq || log "apt-get update reported errors; trying the install anyway"
    fi
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        apt-get update -qq || log "apt-get update reported errors; trying the install anyway"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    log "packages installed ($((SECONDS - T0)) s)"
fi

# ---- 2. directories, /etc/hosts, fake GPUs ---------------------------------------------------------------------
mkdir -p "$SLURM_ETC" "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/ctld" "$GPU_DIR"
for n in "${NODES[@]}"; do mkdir -p "$SPOOL_DIR/$n"; done

if ! grep -q '# nyaflow-testcluster' /etc/hosts; then
    printf '127.0.0.1 %s  # nyaflow-testcluster\n' "${NODES[*]}" >>/etc/hosts
fi

# Slurm 22.05 drops GPUs without a device file; character devices like /dev/null stand in for them.
for ((g = 0; g < NODE_GPUS; g++)); do
    [[ -c $GPU_DIR/nvidia$g ]] || { rm -f "$GPU_DIR/nvidia$g"; mknod -m 666 "$GPU_DIR/nvidia$g" c 1 3; }
done

# ---- 3. configuration -----------------------------------------------------------------------------------------
CTLD_HOST=$(hostname -s)
getent hosts "$CTLD_HOST" >/dev/null || die "this machine's hostname '$CTLD_HOST' does not resolve; add it to /etc/hosts"

tmp=$(mktemp)
{
    cat <<EOF
# Generated by nyaflow cluster/testcluster/up.sh: local test cluster, $((${#NODES[@]})) emulated nodes on one machine.
ClusterName=$CLUSTER
SlurmctldHost=$CTLD_HOST
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=20
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
KillWait=5
JobRequeue=1
MailProg=/bin/true
StateSaveLocation=$STATE_DIR/ctld
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((NODE_MEM_MB / NODE_CPUS))
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
EOF
    k=0
    for n in "${NODES[@]}"; do
        k=$((k + 1))
        echo "NodeName=$n NodeAddr=127.0.0.1 Port=$((NODE_PORT_BASE + k)) CPUs=$NODE_CPUS Sockets=1 CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 RealMemory=$NODE_MEM_MB Gres=gpu:$NODE_GPUS State=UNKNOWN"
    done
    all_nodes=$(IFS=,; echo "${NODES[*]}")
    echo "PartitionName=$PARTITION Nodes=$all_nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
} >"$tmp"
slurm_changed=0
install_if_changed "$tmp" "$SLURM_ETC/slurm.conf" 644 && slurm_changed=1

tmp=$(mktemp)
{
    echo "# Generated by nyaflow cluster/testcluster/up.sh: fake GPUs (character devices) for scheduling only."
    echo "AutoDetect=off"
    echo "NodeName=$(IFS=,; echo "${NODES[*]}") Name=gpu File=$GPU_DIR/nvidia[0-$((NODE_GPUS - 1))]"
} >"$tmp"
install_if_changed "$tmp" "$SLURM_ETC/gres.conf" 644 && slurm_changed=1

tmp=$(mktemp)
cat >"$tmp" <<EOF
# Generated by nyaflow cluster/testcluster/up.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
dbd_changed=0
install_if_changed "$tmp" "$SLURM_ETC/slurmdbd.conf" 600 && dbd_changed=1
chown root:root "$SLURM_ETC/slurmdbd.conf"

# ---- 4. munge ---------------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    log "starting munged"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    stop_pidfile /run/munge/munged.pid munged
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged </dev/null >>"$LOG_DIR/munged.out" 2>&1 9>&-
    wait_for "$WAIT_S" munged munge_ok || { tails /var/log/munge/munged.log "$LOG_DIR/munged.out"; die "munged did not start"; }
fi

# ---- 5. MariaDB --------------------------------------------------------------------------------------------
DB_ADMIN=$(command -v mariadb-admin || command -v mysqladmin)
DB_CLI=$(command -v mariadb || command -v mysql)
db_ok() { "$DB_ADMIN" --connect-timeout=2 ping >/dev/null 2>&1; }
if ! db_ok; then
    log "starting mariadbd"
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOG_DIR/mariadb.log" 2>&1
    fi
    setsid mariadbd --user=mysql </dev/null >>"$LOG_DIR/mariadb.log" 2>&1 9>&- &
    wait_for "$WAIT_S" mariadbd db_ok || { tails "$LOG_DIR/mariadb.log"; die "MariaDB did not answer within ${WAIT_S}s"; }
fi
"$DB_CLI" -u root <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF

# ---- 6. slurmdbd + accounts ---------------------------------------------------------------------------------
if ((dbd_changed)) && pid_alive "$RUN_DIR/slurmdbd.pid" slurmdbd; then
    log "slurmdbd.conf changed: restarting slurmdbd"
    stop_pidfile "$RUN_DIR/slurmdbd.pid" slurmdbd
fi
dbd_ok() { sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }
if ! pid_alive "$RUN_DIR/slurmdbd.pid" slurmdbd; then
    log "starting slurmdbd"
    slurmdbd </dev/null >>"$LOG_DIR/slurmdbd.out" 2>&1 9>&-
fi
wait_for "$WAIT_S" slurmdbd dbd_ok || { tails "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmdbd.out"; die "slurmdbd did not answer within ${WAIT_S}s"; }

if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER" format=cluster) ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if [[ -z $(sacctmgr -n -P show account "$ACCOUNT" format=account) ]]; then
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="nyaflow tests" organization=nyaflow >/dev/null
fi
users=(root)
if [[ -n ${SUDO_USER:-} && ${SUDO_USER} != root ]]; then users+=("$SUDO_USER"); fi
for u in "${users[@]}"; do
    if [[ -z $(sacctmgr -n -P show assoc where cluster="$CLUSTER" account="$ACCOUNT" user="$u" format=user) ]]; then
        sacctmgr -i add user "$u" account="$ACCOUNT" cluster="$CLUSTER" defaultaccount="$ACCOUNT" >/dev/null
    fi
    if [[ $(sacctmgr -n -P show user "$u" format=defaultaccount) != "$ACCOUNT" ]]; then
        sacctmgr -i modify user "$u" set defaultaccount="$ACCOUNT" >/dev/null
    fi
done

# ---- 7. slurmctld + one slurmd per node -----------------------------------------------------------------------
if ((slurm_changed)); then
    if pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
        log "slurm.conf/gres.conf changed: restarting slurmctld and slurmd"
    fi
    for n in "${NODES[@]}"; do stop_pidfile "$RUN_DIR/slurmd-$n.pid" slurmd; done
    stop_pidfile "$RUN_DIR/slurmctld.pid" slurmctld
fi
if ! pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
    # A controller without saved state numbers jobs from 1 again. Old accounting records with the same
    # ids would then answer sacct (and submitit's job.state) for the new jobs: clear them first.
    if [[ ! -e $STATE_DIR/ctld/job_state ]]; then
        old_jobs=$("$DB_CLI" -u root -N -e "SELECT COUNT(*) FROM ${CLUSTER}_job_table" "$DB_NAME" 2>/dev/null || echo 0)
        if [[ $old_jobs != 0 ]]; then
            log "fresh controller state: clearing $old_jobs old job records from accounting (job ids restart at 1)"
            "$DB_CLI" -u root "$DB_NAME" -e "DELETE FROM ${CLUSTER}_step_table; DELETE FROM ${CLUSTER}_suspend_table;
                DELETE FROM ${CLUSTER}_job_env_table; DELETE FROM ${CLUSTER}_job_script_table;
                DELETE FROM ${CLUSTER}_job_table;"
        fi
    fi
    log "starting slurmctld"
    slurmctld </dev/null >>"$LOG_DIR/slurmctld.out" 2>&1 9>&- || { tails "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmctld.out"; die "slurmctld failed to start"; }
fi
wait_for "$WAIT_S" slurmctld scontrol ping || { tails "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmctld.out"; die "slurmctld did not answer within ${WAIT_S}s"; }
for n in "${NODES[@]}"; do
    if ! pid_alive "$RUN_DIR/slurmd-$n.pid" slurmd; then
        log "starting slurmd -N $n"
        slurmd -N "$n" </dev/null >>"$LOG_DIR/slurmd-$n.out" 2>&1 9>&- || { tails "$LOG_DIR/slurmd-$n.log" "$LOG_DIR/slurmd-$n.out"; die "slurmd -N $n failed to start"; }
    fi
done

# ---- 8. wait for the nodes ---------------------------------------------------------------------------------
# A node counts as up when sinfo shows it responsive and usable: idle, or busy with jobs (mix/alloc/comp).
nodes_up() {
    local out
    out=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null) || return 1
    [[ $(grep -cE ' (idle|mix|alloc|comp)$' <<<"$out") -eq ${#NODES[@]} ]]
}
end=$((SECONDS + WAIT_S))
resumed=0
until nodes_up; do
    if ((SECONDS >= end)); then
        sinfo -N -p "$PARTITION" -o '%N %t %E' >&2 || true
        tails "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd-${NODES[0]}.log"
        die "not all ${#NODES[@]} nodes became idle within ${WAIT_S}s (logs in $LOG_DIR)"
    fi
    # Nodes left down/drained by an earlier run (e.g. killed slurmd) come back with a resume.
    states=$(sinfo -h -N -p "$PARTITION" -o '%t' 2>/dev/null || true)
    if ((!resumed)) && grep -qE '^(down|drain|drng|fail)$' <<<"$states"; then
        sleep 2
        scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume >/dev/null 2>&1 || true
        resumed=1
    fi
    sleep 0.5
done
log "cluster '$CLUSTER' up: partition '$PARTITION', nodes ${NODES[*]}, account '$ACCOUNT' ($((SECONDS - T0)) s)"
sinfo -p "$PARTITION"
