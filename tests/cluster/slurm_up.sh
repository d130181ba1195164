#!/usr/bin/env bash
# Start a real single-host Slurm cluster for tests/cluster, idempotently (a second run only checks).
#
#   munged -> private MariaDB (mariadbd --no-defaults, own datadir/socket/port)
#          -> slurmdbd -> slurmctld -> one `slurmd -N nodeK` per virtual node, all on 127.0.0.1.
#
# Needs root and Debian 12 (installs slurmctld slurmd slurm-client slurmdbd munge mariadb-server if
# missing). No systemd: every daemon is started here and stopped by slurm_down.sh. State and logs
# live in $RECAP_SLURM_STATE (default /var/lib/recap-slurm); configs in /etc/slurm. Tunables: see
# slurm_lib.sh (RECAP_SLURM_NODES, _CPUS, _MEM_MB, _PARTITION, _CLUSTER, _DB_PORT, _CRED_EXPIRE).
# Prints how long it took; on failure, the tail of the logs written during this run.
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm_lib.sh
source "$HERE/slurm_lib.sh"
T0=$(date +%s%N)
elapsed() { awk -v t0="$T0" -v t1="$(date +%s%N)" 'BEGIN { printf "%.1f", (t1 - t0) / 1e9 }'; }

if [[ $(id -u) != 0 ]]; then
    echo "slurm_up.sh: must run as root (starts munged, mariadbd and the Slurm daemons)" >&2
    exit 1
fi
take_lock
on_error() {
    local rc=$1 line=$2
    [[ $BASHPID == "$$" ]] || exit "$rc" # a subshell: the main shell reports
    echo "slurm_up.sh: FAILED at line $line (exit $rc) after $(elapsed)s" >&2
    tail_logs "$((T0 / 1000000000))" >&2
    exit "$rc"
}
trap 'on_error $? $LINENO' ERR

# wait_for DESCRIPTION TIMEOUT_S CMD...: poll CMD (quietly) until it succeeds; exit 99 = hopeless.
wait_for() {
    local what=$1 timeout=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if (($? == 99)); then
            echo "slurm_up.sh: gave up waiting for $what: it died" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "slurm_up.sh: timed out after ${timeout}s waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

# ---- packages
PKGS=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]} (apt-get)"
    mkdir -p "$STATE"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >"$STATE/apt.log" 2>&1; then
        tail -n 30 "$STATE/apt.log" >&2
        exit 1
    fi
fi

# ---- directories, /etc/hosts, secrets
install -d -m 0755 "$STATE" "$RUN" "$STATE/slurmd"
install -d -o slurm -g slurm -m 0755 "$LOG"  # slurmctld chdirs here as SlurmUser
install -d -o slurm -g slurm -m 0755 "$STATE/ctld"
install -d -o munge -g munge -m 0700 "$MUNGE_DIR"
install -d -o munge -g munge -m 0755 /run/munge
for f in slurmctld slurmdbd; do
    touch "$LOG/$f.log" && chown slurm:slurm "$LOG/$f.log"
done
touch "$LOG/mariadb.log" && chown mysql:mysql "$LOG/mariadb.log"

mapfile -t NODE_LIST < <(node_names)
missing_hosts=()
for n in "${NODE_LIST[@]}"; do
    addr=$(getent ahostsv4 "$n" 2>/dev/null | awk 'NR==1 {print $1}') || true
    if [[ -z $addr ]]; then
        missing_hosts+=("$n")
    elif [[ $addr != 127.0.0.1 ]]; then
        echo "slurm_up.sh: $n resolves to $addr, not 127.0.0.1; fix /etc/hosts" >&2
        exit 1
    fi
done
if ((${#missing_hosts[@]})); then
    [[ ! -s /etc/hosts || $(tail -c 1 /etc/hosts) == "" ]] || echo >>/etc/hosts
    echo "127.0.0.1 ${missing_hosts[*]} $HOSTS_TAG" >>/etc/hosts
fi

if [[ ! -s $STATE/dbpass ]]; then
    (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$STATE/dbpass")
fi
DB_PASS=$(<"$STATE/dbpass")

# ---- configs (rewritten only when they change; a change restarts the running cluster)
HOST=$(hostname -s)
slurm_conf() {
    cat <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6817
AuthType=auth/munge
CredType=cred/munge
# Also the delay before a requeued job (torchx --max_retries) may start again: default 120 s, min 5.
AuthInfo=cred_expire=$CRED_EXPIRE
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here: track processes by parentage, no task binding; trust the CPUs/memory below.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
# Heterogeneous jobs (torchx: one group per replica) only start through backfill.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
# torchx reads job state only from sacct: accounting through slurmdbd is required.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
EOF
    local k=1 n
    for n in "${NODE_LIST[@]}"; do
        echo "NodeName=$n NodeAddr=127.0.0.1 Port=$((NODE_PORT_BASE + k)) CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN"
        k=$((k + 1))
    done
    echo "PartitionName=$PARTITION Nodes=$(
        IFS=,
        echo "${NODE_LIST[*]}"
    ) Default=YES MaxTime=INFINITE State=UP"
}
slurmdbd_conf() {
    cat <<EOF
$MARKER
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

any_alive() {
    local n
    pid_alive "$RUN/slurmctld.pid" slurmctld || pid_alive "$RUN/slurmdbd.pid" slurmdbd && return 0
    for n in "${NODE_LIST[@]}"; do pid_alive "$RUN/slurmd-$n.pid" slurmd && return 0; done
    return 1
}

# install_conf PATH MODE OWNER CONTENT: returns 0 if the file changed.
install_conf() {
    local path=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp)
    printf '%s\n' "$4" >"$tmp"
    if [[ -e $path ]] && ! head -n 1 "$path" | grep -qxF "$MARKER" && [[ ${RECAP_SLURM_FORCE:-0} != 1 ]]; then
        rm -f "$tmp"
        echo "slurm_up.sh: $path exists and was not written by this script; refusing to overwrite" \
            "(set RECAP_SLURM_FORCE=1 to replace it)" >&2
        exit 1
    fi
    if [[ -e $path ]] && cmp -s "$tmp" "$path" && [[ $(stat -c '%a %U:%G' "$path") == "$mode $owner" ]]; then
        rm -f "$tmp"
        return 1
    fi
    install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$tmp" "$path"
    rm -f "$tmp"
    return 0
}

mkdir -p "$SLURM_ETC"
changed=0
if install_conf "$SLURM_CONF" 644 root:root "$(slurm_conf)"; then changed=1; fi
if install_conf "$SLURMDBD_CONF" 600 slurm:slurm "$(slurmdbd_conf)"; then changed=1; fi
# A config counts as applied only once a start with it succeeded (a failed restart must not stick).
for f in "$SLURM_CONF" "$SLURMDBD_CONF"; do
    cmp -s "$f" "$RUN/${f##*/}.applied" || changed=1
done
if ((changed)) && any_alive; then
    echo "Slurm config changed: restarting the cluster"
    "$HERE/slurm_down.sh"
fi

# ---- munge (reuse a munged that already answers, e.g. a system one; we stop only our own)
if [[ ! -s /etc/munge/munge.key ]]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
fi
munge_ok() { munge -n | unmunge; }
if ! munge_ok >/dev/null 2>&1; then
    echo "starting munged"
    runuser -u munge -- munged --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        </dev/null >>"$MUNGE_DIR/munged.out" 2>&1 9>&-
    wait_for munged 15 munge_ok
fi

# ---- MariaDB, private to this cluster
DB_PID=$DB_DIR/mariadbd.pid
if [[ ! -d $DB_DIR/mysql ]]; then
    echo "initialising MariaDB in $DB_DIR"
    install -d -o mysql -g mysql -m 0700 "$DB_DIR"
    mariadb-install-db --no-defaults --datadir="$DB_DIR" --user=mysql --auth-root-authentication-method=socket \
        --skip-test-db --skip-name-resolve >"$LOG/mariadb-install.log" 2>&1
fi
db_launched=
if ! pid_alive "$DB_PID" mariadbd; then
    echo "starting mariadbd on 127.0.0.1:$DB_PORT"
    setsid mariadbd --no-defaults --datadir="$DB_DIR" --socket="$DB_SOCK" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --skip-name-resolve --user=mysql --pid-file="$DB_PID" \
        --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=256M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 </dev/null >>"$LOG/mariadb.out" 2>&1 9>&- &
    db_launched=$!
fi
db_ready() {
    mariadb-admin --no-defaults --socket="$DB_SOCK" -u root ping && return 0
    [[ -z $db_launched ]] || proc_alive "$db_launched" mariadbd || return 99
    return 1
}
wait_for "mariadbd ($DB_SOCK)" 60 db_ready
mariadb --no-defaults --socket="$DB_SOCK" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

# ---- slurmdbd, cluster registration
if ! pid_alive "$RUN/slurmdbd.pid" slurmdbd; then
    echo "starting slurmdbd"
    slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 9>&-
fi
wait_for slurmdbd 30 sacctmgr -n -P list cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qxF "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

# ---- slurmctld, slurmd per virtual node
if ! pid_alive "$RUN/slurmctld.pid" slurmctld; then
    echo "starting slurmctld"
    slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1 9>&-
fi
wait_for slurmctld 30 scontrol ping
for n in "${NODE_LIST[@]}"; do
    if ! pid_alive "$RUN/slurmd-$n.pid" slurmd; then
        echo "starting slurmd -N $n"
        install -d -m 0755 "$STATE/slurmd/$n"
        slurmd -N "$n" </dev/null >>"$LOG/slurmd-$n.out" 2>&1 9>&-
    fi
done

# ---- ready: every node idle, or busy with jobs when the cluster was already up (resume any left
# down/drained by an earlier run), and sacct answers
nodes_idle() {
    local states
    states=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null) || return 1
    [[ $(awk '$2 ~ /^(idle|mix|alloc|comp)$/' <<<"$states" | wc -l) -eq ${#NODE_LIST[@]} ]] && return 0
    awk '$2 ~ /^(down|drain|drng|fail)$/ {print $1}' <<<"$states" | while read -r n; do
        scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
    done
    return 1
}
if ! wait_for "nodes ${NODE_LIST[*]} idle" 60 nodes_idle; then
    sinfo -N -p "$PARTITION" -o '%N %t %E' >&2 || true
    false
fi
wait_for sacct 30 sacct -n -X -S now

for f in "$SLURM_CONF" "$SLURMDBD_CONF"; do
    install -m 0600 "$f" "$RUN/${f##*/}.applied"
done
echo "slurm cluster '$CLUSTER' up: ${#NODE_LIST[@]} nodes x $NODE_CPUS CPUs in partition '$PARTITION'," \
    "sacct ok (took $(elapsed)s; state and logs in $STATE)"
