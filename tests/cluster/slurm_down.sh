#!/usr/bin/env bash
# Stop everything slurm_up.sh started: cancel the jobs, then slurmd (each node), slurmctld, slurmdbd,
# mariadbd and munged (only a munged we started). Safe to run when nothing is running.
# Keeps $RECAP_SLURM_STATE (database, logs) so the next start is fast; `--purge` also deletes it,
# our /etc/slurm configs and our /etc/hosts line.
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm_lib.sh
source "$HERE/slurm_lib.sh"
T0=$(date +%s%N)

PURGE=0
case ${1:-} in
"") ;;
--purge) PURGE=1 ;;
*)
    echo "usage: $0 [--purge]" >&2
    exit 2
    ;;
esac
if [[ $(id -u) != 0 ]]; then
    echo "slurm_down.sh: must run as root" >&2
    exit 1
fi

take_lock
mapfile -t NODE_LIST < <(node_names)
# Nodes from a bigger earlier cluster (RECAP_SLURM_NODES changed) still have pid files.
for f in "$RUN"/slurmd-*.pid; do
    [[ -e $f ]] || continue
    n=${f##*/slurmd-}
    n=${n%.pid}
    [[ " ${NODE_LIST[*]} " == *" $n "* ]] || NODE_LIST+=("$n")
done

# Jobs first, while slurmctld and the slurmds can still kill them (proctrack/linuxproc: a job's
# processes would outlive a stopped slurmd). Our only partition holds every job.
if pid_alive "$RUN/slurmctld.pid" slurmctld && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
    echo "cancelling jobs: $(squeue -h -o %i | tr '\n' ' ')"
    scancel -p "$PARTITION" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
        sleep 0.1
    done
    if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
        echo "warning: jobs still listed after 30s:" >&2
        squeue >&2 || true
    fi
fi

for n in "${NODE_LIST[@]}"; do
    stop_pidfile "$RUN/slurmd-$n.pid" slurmd
done
stop_pidfile "$RUN/slurmctld.pid" slurmctld
stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
stop_pidfile "$DB_DIR/mariadbd.pid" mariadbd 60
stop_pidfile "$MUNGE_DIR/munged.pid" munged

# Report (never kill by name) job steps that survived.
left=()
for stat in /proc/[0-9]*/stat; do
    s=$(cat "$stat" 2>/dev/null) || continue
    [[ $s == *"(slurmstepd)"* ]] || continue
    state=${s##*) }
    [[ ${state%% *} == Z ]] && continue
    p=${stat#/proc/}
    left+=("${p%/stat}")
done
if ((${#left[@]})); then
    echo "warning: slurmstepd still running (pids ${left[*]}); not killed" >&2
fi

if ((PURGE)); then
    for f in "$SLURM_CONF" "$SLURMDBD_CONF"; do
        if [[ -e $f ]] && head -n 1 "$f" | grep -qxF "$MARKER"; then rm -f "$f"; fi
    done
    if grep -qF "$HOSTS_TAG" /etc/hosts; then
        # /etc/hosts may be a bind mount: rewrite in place rather than rename over it.
        hosts=$(grep -vF "$HOSTS_TAG" /etc/hosts)
        printf '%s\n' "$hosts" >/etc/hosts
    fi
    rm -rf "$STATE"
    echo "purged $STATE, our /etc/slurm configs and /etc/hosts entries"
fi
echo "slurm cluster stopped (took $(awk -v t0="$T0" -v t1="$(date +%s%N)" 'BEGIN { printf "%.1f", (t1 - t0) / 1e9 }')s)"
