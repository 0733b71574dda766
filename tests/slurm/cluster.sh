#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost for the tests, built from Debian's packages.
#
#   tests/slurm/cluster.sh start  [STATE_DIR]   install the packages if missing, start munged, slurmctld, slurmd
#   tests/slurm/cluster.sh stop   [STATE_DIR]   cancel leftover jobs, stop exactly the daemons started from STATE_DIR
#   tests/slurm/cluster.sh env    [STATE_DIR]   print `export SLURM_CONF=...` (eval "$(tests/slurm/cluster.sh env)")
#   tests/slurm/cluster.sh status [STATE_DIR]   exit 0 when all three daemons run and the node answers
#   tests/slurm/cluster.sh logs   [STATE_DIR]   print the tails of the daemon logs
#
# STATE_DIR defaults to $SLURM_CLUSTER_STATE_DIR, else /tmp/dlightning-slurm. Everything lives there: slurm.conf,
# cgroup.conf, a private munge key and munged, the controller state, the slurmd spool, pid and log files (only the
# munge socket moves to /tmp/dlightning-munge-<n> when a folder above STATE_DIR is not world-searchable). Nothing
# under /etc/slurm or /etc/munge is read or written; the host's munge service is neither used nor started.
# Every client command (sbatch, srun, scontrol, scancel, sinfo, squeue) needs SLURM_CONF=STATE_DIR/slurm.conf.
#
# Environment knobs: SLURM_CLUSTER_CPUS (default: nproc, at least 2), SLURM_CLUSTER_CTLD_PORT (6817),
# SLURM_CLUSTER_SLURMD_PORT (6818), SLURM_CLUSTER_KILLWAIT (10 s), SLURM_CLUSTER_START_TIMEOUT (60 s).
#
# Exit status: 0 ok; 1 failure (daemon logs printed); 2 usage; 3 cannot be set up here: start not run as
# root, or the packages are missing and there is no apt-get.
set -euo pipefail

readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly DEFAULT_STATE_DIR=/tmp/dlightning-slurm
readonly EXIT_NO_PACKAGES=3

log() { printf '[cluster.sh] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------- paths and settings

init_paths() {
    local dir=$1
    case $dir in
        /*) ;;
        *) dir="$PWD/$dir" ;;
    esac
    STATE_DIR=${dir%/}
    CONF="$STATE_DIR/slurm.conf"
    RUN_DIR="$STATE_DIR/run"
    LOG_DIR="$STATE_DIR/log"
    # munged needs every folder above its socket searchable by all (pytest's /tmp/pytest-of-USER is 0700)
    # and a socket path is limited to 107 bytes: otherwise the socket goes to a short folder in /tmp.
    MUNGE_DIR="$STATE_DIR/munge"
    if ! all_searchable "$STATE_DIR" || ((${#MUNGE_DIR} > 80)); then
        MUNGE_DIR="/tmp/dlightning-munge-$(printf '%s' "$STATE_DIR" | cksum | cut -d' ' -f1)"
    fi
    MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
    # munged wants its socket directory world-searchable, its key and seed private.
    MUNGE_KEY_DIR="$STATE_DIR/munge-key"
    MUNGE_KEY="$MUNGE_KEY_DIR/munge.key"
    MUNGED_PID="$RUN_DIR/munged.pid"
    SLURMCTLD_PID="$RUN_DIR/slurmctld.pid"
    SLURMD_PID="$RUN_DIR/slurmd.pid"
    NODE=$(hostname -s)
    CTLD_PORT=${SLURM_CLUSTER_CTLD_PORT:-6817}
    SLURMD_PORT=${SLURM_CLUSTER_SLURMD_PORT:-6818}
    KILL_WAIT=${SLURM_CLUSTER_KILLWAIT:-10}
    START_TIMEOUT=${SLURM_CLUSTER_START_TIMEOUT:-60}
    # The shortest step-credential lifetime SLURM accepts is 5 s; it is also how long a requeued job waits
    # before it may start again (slurm.conf(5), AuthInfo cred_expire), so keep it short.
    CRED_EXPIRE=10
    export SLURM_CONF="$CONF"
}

# all_searchable DIR: DIR (if it exists) and every folder above it can be entered by everyone.
all_searchable() {
    local dir=$1
    while [[ -n $dir && $dir != / ]]; do
        if [[ -e $dir ]] && [[ $(stat -c '%A' "$dir") != ?????????[xt] ]]; then
            return 1
        fi
        dir=${dir%/*}
    done
}

# ---------------------------------------------------------------- processes

# pid_of NAME PIDFILE: print the pid when PIDFILE names a live process whose command name starts with NAME.
pid_of() {
    local name=$1 pidfile=$2 pid comm
    [[ -r $pidfile ]] || return 1
    read -r pid 2>/dev/null <"$pidfile" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm ]] || return 1
    read -r comm 2>/dev/null <"/proc/$pid/comm" || return 1
    [[ $comm == "$name"* ]] || return 1
    printf '%s\n' "$pid"
}

is_running() { pid_of "$1" "$2" >/dev/null; }

# stop_pid NAME PIDFILE: SIGTERM, wait up to 20 s, then SIGKILL; remove the pid file.
stop_pid() {
    local name=$1 pidfile=$2 pid i
    if ! pid=$(pid_of "$name" "$pidfile"); then
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
        log "$name (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
    fi
    [[ -d /proc/$pid ]] && die "$name (pid $pid) did not exit"
    rm -f "$pidfile"
}

# Our slurmstepd processes: they inherit slurmd's environment, which carries SLURM_CONF=$CONF.
our_stepds() {
    local d pid comm
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [[ -r $d/comm ]] || continue
        read -r comm 2>/dev/null <"$d/comm" || continue
        [[ $comm == slurmstepd* ]] || continue
        if tr '\0' '\n' 2>/dev/null <"$d/environ" | grep -qxF "SLURM_CONF=$CONF"; then
            printf '%s\n' "$pid"
        fi
    done
}

# descendants PID: every process below PID (children first found through /proc/*/stat).
descendants() {
    local -A children=()
    local stat rest pid ppid
    for stat in /proc/[0-9]*/stat; do
        read -r rest 2>/dev/null <"$stat" || continue
        pid=${rest%% *}
        rest=${rest##*) } # after "(comm) ": state ppid ...
        ppid=${rest#* }
        ppid=${ppid%% *}
        children[$ppid]+="$pid "
    done
    local -a queue=("$1")
    local p c
    while ((${#queue[@]})); do
        p=${queue[0]}
        queue=("${queue[@]:1}")
        for c in ${children[$p]:-}; do
            printf '%s\n' "$c"
            queue+=("$c")
        done
    done
}

# ---------------------------------------------------------------- packages

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
            printf '%s\n' "$pkg"
        fi
    done
}

install_packages() {
    local -a missing
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        log "missing Debian packages: ${missing[*]}; installing them needs root (apt-get install ${missing[*]})"
        exit "$EXIT_NO_PACKAGES"
    fi
    if ! command -v apt-get >/dev/null; then
        log "missing packages ${missing[*]} and no apt-get to install them"
        exit "$EXIT_NO_PACKAGES"
    fi
    log "installing ${missing[*]}"
    # Keep the packages' init scripts from starting the host's munge/slurm services while they install: our
    # daemons run from STATE_DIR. Only when no policy-rc.d exists (containers usually ship one) and only for
    # the length of the install.
    local policy=/usr/sbin/policy-rc.d added_policy=0 rc=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, from dlightning tests/slurm/cluster.sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added_policy=1
    fi
    {
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install -y -qq \
                --no-install-recommends "${missing[@]}"
    } >"${TMPDIR:-/tmp}/dlightning-slurm-apt.log" 2>&1 || rc=$?
    ((added_policy)) && rm -f "$policy"
    if ((rc)); then
        tail -n 40 "${TMPDIR:-/tmp}/dlightning-slurm-apt.log" >&2 || true
        die "apt-get failed (exit $rc) installing ${missing[*]}"
    fi
    log "installed ${missing[*]}"
}

# ---------------------------------------------------------------- configuration

write_config() {
    local cpus mem_kb mem_mb
    cpus=${SLURM_CLUSTER_CPUS:-$(nproc)}
    ((cpus >= 2)) || cpus=2 # two 1-CPU tasks must fit; SlurmdParameters=config_overrides allows it
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mem_mb=$((mem_kb * 95 / 100 / 1024))
    cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh for $NODE: a one-node test cluster, everything under $STATE_DIR.
ClusterName=dlightning
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd, no cgroups: track processes through /proc, no task containment, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Finished jobs are also appended here (scontrol forgets them after MinJobAge).
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2,sched_min_interval=100000
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
# Keep finished jobs visible to "scontrol show job" for 5 minutes.
MinJobAge=300
# SIGTERM -> SIGKILL grace on cancel, requeue and time limit.
KillWait=$KILL_WAIT
OverTimeLimit=0
InactiveLimit=0
Waittime=0
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    # Not loaded with the plugins above; present so that nothing falls back to /etc/slurm/cgroup.conf.
    cat >"$STATE_DIR/cgroup.conf" <<EOF
# Written by tests/slurm/cluster.sh: no cgroup plugin is configured in slurm.conf.
CgroupAutomount=no
IgnoreSystemd=yes
EOF
}

# ---------------------------------------------------------------- daemons

start_munged() {
    if is_running munged "$MUNGED_PID"; then
        return 0
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating munge key $MUNGE_KEY"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chmod 0400 "$MUNGE_KEY"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    log "starting munged"
    munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="$MUNGED_PID" \
        --log-file="$LOG_DIR/munged.log" --seed-file="$MUNGE_KEY_DIR/munged.seed" \
        </dev/null >>"$LOG_DIR/munged.log" 2>&1 || return 1
    local i
    for ((i = 0; i < 100; i++)); do
        if [[ -S $MUNGE_SOCKET ]] && munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    log "munged does not answer on $MUNGE_SOCKET"
    return 1
}

# start_daemon NAME PIDFILE CMD...: start a self-daemonizing SLURM daemon and wait for its pid file.
start_daemon() {
    local name=$1 pidfile=$2 i
    shift 2
    if is_running "$name" "$pidfile"; then
        return 0
    fi
    rm -f "$pidfile"
    log "starting $name"
    "$@" </dev/null >>"$LOG_DIR/$name.stdout" 2>&1 || return 1
    for ((i = 0; i < 100; i++)); do
        is_running "$name" "$pidfile" && return 0
        sleep 0.1
    done
    log "$name wrote no pid file $pidfile"
    return 1
}

node_state() { sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -n 1; }

wait_node_idle() {
    local deadline state
    deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
            idle | mix | alloc) return 0 ;;
        esac
        sleep 0.5
    done
    log "node $NODE not idle after ${START_TIMEOUT}s (state: ${state:-no answer})"
    scontrol show node "$NODE" >&2 2>/dev/null || true
    return 1
}

print_logs() {
    local f
    for f in "$LOG_DIR"/munged.log "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log "$LOG_DIR"/*.stdout; do
        [[ -s $f ]] || continue
        printf '\n===== %s (last 60 lines) =====\n' "$f" >&2
        tail -n 60 "$f" >&2
    done
}

all_running() {
    is_running munged "$MUNGED_PID" && is_running slurmctld "$SLURMCTLD_PID" && is_running slurmd "$SLURMD_PID"
}

print_env() { printf 'export SLURM_CONF=%q\n' "$CONF"; }

# ---------------------------------------------------------------- subcommands

cmd_start() {
    umask 022
    if [[ $(id -u) -ne 0 ]]; then
        # slurmd must be root to start jobs (and apt-get to install the packages)
        log "start needs root: slurmd runs as root and the packages may need installing"
        exit "$EXIT_NO_PACKAGES"
    fi
    install_packages
    if all_running && [[ $(node_state || true) =~ ^(idle|mix|alloc) ]]; then
        log "already running from $STATE_DIR (node $NODE: $(node_state))"
        print_env
        return 0
    fi
    mkdir -p "$STATE_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/ctld" "$STATE_DIR/spool"
    mkdir -p "$MUNGE_DIR" "$MUNGE_KEY_DIR"
    chmod 0755 "$MUNGE_DIR"
    chmod 0700 "$MUNGE_KEY_DIR"
    local t0=$SECONDS
    if ! is_running slurmctld "$SLURMCTLD_PID"; then
        # A fresh controller (-c: no jobs recovered, job ids from 1 again) gets fresh logs.
        local f
        for f in slurmctld.log slurmd.log jobcomp.log munged.log slurmctld.stdout slurmd.stdout; do
            [[ -e $LOG_DIR/$f ]] && mv -f "$LOG_DIR/$f" "$LOG_DIR/$f.old"
        done
        write_config
    fi
    if ! start_munged ||
        ! start_daemon slurmctld "$SLURMCTLD_PID" slurmctld -f "$CONF" -c ||
        ! start_daemon slurmd "$SLURMD_PID" slurmd -f "$CONF" ||
        ! wait_node_idle; then
        print_logs
        log "start failed; stopping what runs from $STATE_DIR"
        cmd_stop || true
        exit 1
    fi
    log "cluster up in $((SECONDS - t0))s: node $NODE $(node_state), $(sinfo -h -o '%P %c CPUs %m MB'); SLURM_CONF=$CONF"
    print_env
}

cmd_stop() {
    local ids pid i
    if is_running slurmctld "$SLURMCTLD_PID"; then
        ids=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
        if [[ -n ${ids// /} ]]; then
            log "cancelling jobs: $ids"
            # shellcheck disable=SC2086 # word splitting of the id list is intended
            scancel $ids 2>/dev/null || true
            for ((i = 0; i < (KILL_WAIT + 20) * 2; i++)); do
                [[ -z $(squeue -h -o '%A' 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_pid slurmd "$SLURMD_PID"
    stop_pid slurmctld "$SLURMCTLD_PID"
    # Job steps whose slurmd is gone: end them (and their tasks) so nothing of ours keeps running.
    local -a tree
    for pid in $(our_stepds); do
        mapfile -t tree < <(descendants "$pid")
        log "killing leftover slurmstepd $pid and its processes ${tree[*]}"
        kill -KILL "$pid" "${tree[@]}" 2>/dev/null || true
    done
    if is_running munged "$MUNGED_PID"; then
        stop_pid munged "$MUNGED_PID"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    [[ $MUNGE_DIR == "$STATE_DIR"/* ]] || rmdir "$MUNGE_DIR" 2>/dev/null || true
    log "stopped (state in $STATE_DIR)"
}

cmd_status() {
    local name pidfile pid ok=0
    for name in munged slurmctld slurmd; do
        pidfile="$RUN_DIR/$name.pid"
        if pid=$(pid_of "$name" "$pidfile"); then
            log "$name running (pid $pid)"
        else
            log "$name not running"
            ok=1
        fi
    done
    if ((ok == 0)); then
        log "node $NODE: $(node_state || echo 'no answer')"
        [[ $(node_state || true) =~ ^(idle|mix|alloc) ]] || ok=1
    fi
    return "$ok"
}

main() {
    (($# >= 1)) || usage
    local cmd=$1
    shift
    (($# <= 1)) || usage
    init_paths "${1:-${SLURM_CLUSTER_STATE_DIR:-$DEFAULT_STATE_DIR}}"
    case $cmd in
        start) cmd_start ;;
        stop) cmd_stop ;;
        env) print_env ;;
        status) cmd_status ;;
        logs) print_logs ;;
        -h | --help | help) usage ;;
        *) usage ;;
    esac
}

main "$@"
