#!/usr/bin/env bash
# A real two-node SLURM cluster on loopback, for tests and laptops.
#
#   slurm/local-cluster.sh start    install SLURM + munge if missing, start munged,
#                                   slurmctld and two slurmd (n1, n2); wait until idle
#   slurm/local-cluster.sh stop     cancel every job, stop the daemons by their pidfiles
#   slurm/local-cluster.sh status   daemons and node states; exit 0 when up, 3 when down
#   slurm/local-cluster.sh env      print the export line clients need (SLURM_CONF)
#
# Both "nodes" are this host (NodeAddr=127.0.0.1, one slurmd per node on its own
# port), so jobs see the repository and its .venv. Runs as root (CI) and changes
# the machine only where it must: Debian packages, /run/munge, "n1 n2" in
# /etc/hosts (submitit takes MASTER_ADDR from the first node name), and a
# /etc/slurm/slurm.conf symlink when no other slurm.conf is there.
#
# Settings (environment):
#   ADPM_SLURM_STATE      scratch folder for config, state, spool, logs, pidfiles
#                         (default: <repo>/.services/slurm)
#   ADPM_SLURM_CTLD_PORT  slurmctld port (default 16817)
#   ADPM_SLURM_NODE_PORTS slurmd ports of n1,n2 as "A-B" (default 17001-17002)
#   ADPM_SLURM_START_TIMEOUT  seconds to wait for idle nodes (default 90)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
STATE="${ADPM_SLURM_STATE:-$REPO/.services/slurm}"
CTLD_PORT="${ADPM_SLURM_CTLD_PORT:-16817}"
NODE_PORTS="${ADPM_SLURM_NODE_PORTS:-17001-17002}"
START_TIMEOUT="${ADPM_SLURM_START_TIMEOUT:-90}"
CONF="$STATE/slurm.conf"
RUN="$STATE/run"
NODES=(n1 n2)
SYSTEM_CONF=/etc/slurm/slurm.conf

log() { echo "[local-cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Client commands must read our config; SLURM_CONF wins over /etc/slurm/slurm.conf.
export SLURM_CONF="$CONF"
# The daemons live in /usr/sbin, which a non-login root shell may lack.
export PATH="$PATH:/usr/sbin"

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; install as root: apt-get install slurm-wlm munge slurm-client"
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing slurm-wlm, munge, slurm-client (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurm-wlm munge slurm-client >/dev/null
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        return 0
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    # Remember that this script started munged, so that stop ends it (and only then).
    local i
    for i in $(seq 1 50); do
        if [ -s /run/munge/munged.pid ] && munge_works; then
            cp /run/munge/munged.pid "$RUN/munged.pid"
            return 0
        fi
        sleep 0.2
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

ensure_hosts() {
    local missing=()
    for n in "${NODES[@]}"; do
        getent hosts "$n" >/dev/null 2>&1 || missing+=("$n")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "adding '127.0.0.1 ${missing[*]}' to /etc/hosts"
        echo "127.0.0.1 ${missing[*]}" >>/etc/hosts
    fi
}

write_conf() {
    mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log" "$RUN"
    local ncpu
    ncpu="$(nproc 2>/dev/null || echo 2)"
    [ "$ncpu" -ge 2 ] || ncpu=2
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh: two nodes on loopback, no accounting, no cgroups.
ClusterName=adpm-loopback
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after the credential lifetime (default 120 s).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Requeued jobs wait for the next pass of the scheduler: keep passes frequent.
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
# Keep finished jobs visible to squeue for an hour: adpm_dist/launch/bin/sacct answers from it.
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$NODE_PORTS] CPUs=$ncpu RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    # Let plain `sbatch` find the config when this machine has no slurm.conf of its own.
    if [ ! -e "$SYSTEM_CONF" ] || [ "$(readlink "$SYSTEM_CONF" 2>/dev/null)" = "$CONF" ]; then
        mkdir -p "$(dirname "$SYSTEM_CONF")"
        ln -sfn "$CONF" "$SYSTEM_CONF"
    fi
}

# pid_alive PIDFILE NAME: the pid in PIDFILE is running and is NAME (guards against reuse).
pid_alive() {
    local pidfile="$1" name="$2" pid
    [ -s "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$name"
}

all_daemons_alive() {
    pid_alive "$RUN/slurmctld.pid" slurmctld || return 1
    for n in "${NODES[@]}"; do pid_alive "$RUN/slurmd-$n.pid" slurmd || return 1; done
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) states
    while [ "$SECONDS" -lt "$deadline" ]; do
        states="$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)"
        if [ "$(echo "$states" | grep -cE '^n[12] (idle|mix|alloc)')" -eq 2 ]; then
            log "nodes up: $(echo "$states" | tr '\n' ' ')"
            return 0
        fi
        # A node left down/drained by an earlier run: ask the controller to take it back.
        if echo "$states" | grep -qE '(down|drain|drng)'; then
            timeout 10 scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
        fi
        sleep 1
    done
    log "nodes not idle after ${START_TIMEOUT}s: ${states:-no answer from sinfo}"
    log "slurmctld log tail:"; tail -n 20 "$STATE/log/slurmctld.log" >&2 || true
    return 1
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "run as root (the daemons run as SlurmUser=root)"
    install_packages
    mkdir -p "$RUN"
    start_munge
    ensure_hosts
    if all_daemons_alive; then
        log "already running (state in $STATE)"
        wait_idle
        cmd_env
        return 0
    fi
    # A half-started cluster from an earlier run: stop what is left, then start clean.
    stop_daemons
    write_conf
    log "starting slurmctld (port $CTLD_PORT)"
    slurmctld -f "$CONF"
    local n
    for n in "${NODES[@]}"; do
        log "starting slurmd -N $n"
        mkdir -p "$STATE/spool/$n"
        slurmd -f "$CONF" -N "$n"
    done
    wait_idle || { stop_daemons; die "cluster did not come up; logs in $STATE/log"; }
    cmd_env
}

# stop_pid PIDFILE NAME: TERM, wait up to 15 s, then KILL; remove the pidfile.
stop_pid() {
    local pidfile="$1" name="$2" pid i
    if pid_alive "$pidfile" "$name"; then
        pid="$(tr -dc '0-9' <"$pidfile")"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 75); do
            [ -d "/proc/$pid" ] || break
            sleep 0.2
        done
        if [ -d "/proc/$pid" ]; then
            log "$name ($pid) ignored TERM; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

stop_daemons() {
    local n
    for n in "${NODES[@]}"; do stop_pid "$RUN/slurmd-$n.pid" slurmd; done
    stop_pid "$RUN/slurmctld.pid" slurmctld
}

cancel_all_jobs() {
    # Jobs' processes outlive slurmd, so end them through SLURM first (bounded).
    pid_alive "$RUN/slurmctld.pid" slurmctld || return 0
    timeout 10 scancel --user=root >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 30))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if [ -z "$(timeout 10 squeue -h -t PENDING,RUNNING,COMPLETING,SUSPENDED,REQUEUED -o %i 2>/dev/null)" ]; then
            return 0
        fi
        sleep 0.5
    done
    log "jobs still listed after 30 s; stopping daemons anyway"
}

cmd_stop() {
    cancel_all_jobs
    stop_daemons
    # munged only if this script started it.
    if [ -s "$RUN/munged.pid" ]; then
        if [ "$(tr -dc '0-9' <"$RUN/munged.pid")" = "$(tr -dc '0-9' </run/munge/munged.pid 2>/dev/null)" ]; then
            stop_pid "$RUN/munged.pid" munged
        fi
        rm -f "$RUN/munged.pid"
    fi
    if [ "$(readlink "$SYSTEM_CONF" 2>/dev/null)" = "$CONF" ]; then
        rm -f "$SYSTEM_CONF"
    fi
}

cmd_status() {
    local up=0 n
    if pid_alive "$RUN/slurmctld.pid" slurmctld; then
        echo "slurmctld: running (pid $(cat "$RUN/slurmctld.pid"))"
    else
        echo "slurmctld: stopped"; up=3
    fi
    for n in "${NODES[@]}"; do
        if pid_alive "$RUN/slurmd-$n.pid" slurmd; then
            echo "slurmd $n: running (pid $(cat "$RUN/slurmd-$n.pid"))"
        else
            echo "slurmd $n: stopped"; up=3
        fi
    done
    if munge_works; then echo "munge: ok"; else echo "munge: not working"; up=3; fi
    if [ "$up" -eq 0 ]; then
        timeout 10 sinfo -N -o '%N %P %t %c' || up=3
        timeout 10 squeue || true
    fi
    echo "config: $CONF"
    return "$up"
}

cmd_env() {
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
