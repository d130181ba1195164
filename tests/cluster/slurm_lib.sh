# shellcheck shell=bash disable=SC2034  # sourced: the variables are used by the scripts
# Shared by slurm_up.sh and slurm_down.sh (sourced, not run). Paths and process helpers for the
# single-host test cluster. Everything mutable lives under $STATE; the Slurm configs go to /etc/slurm
# (where every Slurm client looks) and carry $MARKER so we never overwrite a config we did not write.

STATE=${RECAP_SLURM_STATE:-/var/lib/recap-slurm}
NODES=${RECAP_SLURM_NODES:-2}
NODE_CPUS=${RECAP_SLURM_CPUS:-4}
NODE_MEM_MB=${RECAP_SLURM_MEM_MB:-16384}  # advertised, not enforced (CR_CPU): recap.train asks 8192
PARTITION=${RECAP_SLURM_PARTITION:-debug}
CLUSTER=${RECAP_SLURM_CLUSTER:-recap}
DB_PORT=${RECAP_SLURM_DB_PORT:-3399}
CRED_EXPIRE=${RECAP_SLURM_CRED_EXPIRE:-10}  # seconds; = requeue delay
NODE_PORT_BASE=${RECAP_SLURM_NODE_PORT_BASE:-17000}  # nodeK's slurmd listens on BASE+K

SLURM_ETC=/etc/slurm
SLURM_CONF=$SLURM_ETC/slurm.conf
SLURMDBD_CONF=$SLURM_ETC/slurmdbd.conf
MARKER="# Managed by recap tests/cluster/slurm_up.sh"
HOSTS_TAG="# recap-slurm"

LOG=$STATE/log        # slurm + mariadb logs
RUN=$STATE/run        # pid files
MUNGE_DIR=$STATE/munge  # munged is picky: its log/pid dir must belong to munge and not be shared
DB_DIR=$STATE/mysql
DB_SOCK=$DB_DIR/mysqld.sock  # mariadbd runs as mysql: the socket must be in a dir it owns

# One slurm_up/slurm_down at a time (slurm_up calls slurm_down itself when the config changed).
# Daemons must not inherit fd 9: start them with `9>&-`, or they would hold the lock forever.
take_lock() {
    [[ ${RECAP_SLURM_LOCK_HELD:-0} == 1 ]] && return 0
    exec 9>"${RECAP_SLURM_LOCK:-/run/lock/recap-slurm.lock}"
    if ! flock -w 600 9; then
        echo "$0: another slurm_up.sh/slurm_down.sh held the lock for 600s" >&2
        exit 1
    fi
    export RECAP_SLURM_LOCK_HELD=1
}

node_names() {
    local k
    for ((k = 1; k <= NODES; k++)); do echo "node$k"; done
}

# pid_alive PIDFILE COMM: the pid in PIDFILE is a live (not zombie) process whose comm starts
# with COMM. PID 1 on these machines does not reap, so a killed daemon lingers as a zombie and
# `kill -0` would still succeed: read the state from /proc/PID/stat instead.
pid_alive() {
    local pidfile=$1 comm=$2 pid
    pid=$(cat "$pidfile" 2>/dev/null) || return 1  # daemons delete their pid file on exit
    proc_alive "$pid" "$comm"
}

# proc_alive PID COMM: same check for a known pid.
proc_alive() {
    local pid=$1 comm=$2 stat state
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    state=${stat##*) }
    state=${state%% *}
    [[ $state != Z && $state != X ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]]
}

# stop_pidfile PIDFILE COMM [TIMEOUT]: SIGTERM, wait until gone or zombie, then SIGKILL.
stop_pidfile() {
    local pidfile=$1 comm=$2 timeout=${3:-20} pid i
    pid=$(cat "$pidfile" 2>/dev/null) || true
    if ! proc_alive "$pid" "$comm"; then
        rm -f "$pidfile"
        return 0
    fi
    echo "stopping $comm (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        proc_alive "$pid" "$comm" || break
        sleep 0.1
    done
    if proc_alive "$pid" "$comm"; then
        echo "  $comm (pid $pid) ignored SIGTERM for ${timeout}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            proc_alive "$pid" "$comm" || break
            sleep 0.1
        done
    fi
    rm -f "$pidfile"
}

# tail_logs [SINCE_EPOCH]: the end of every log written since SINCE_EPOCH (default: all).
tail_logs() {
    local f since=${1:-0}
    for f in "$LOG"/*.log "$LOG"/*.out "$MUNGE_DIR"/munged.log "$MUNGE_DIR"/munged.out; do
        [[ -s $f ]] || continue
        (($(stat -c %Y "$f") >= since)) || continue
        echo "----- tail -n 25 $f"
        tail -n 25 "$f"
    done
}
