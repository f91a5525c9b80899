#!/usr/bin/env bash
# Stop the local cluster that cluster/local/up.sh started under
# COMOD_LOCAL_TEMP_DIR [/tmp/comod-ray], and nothing else: every process whose
# command line mentions that temp dir (the head's and workers' Ray processes),
# and the processes they started (Ray workers, job drivers). Other Ray
# instances on this machine are left alone (`ray stop` would stop them all).
# Like `ray stop`, it sends SIGTERM, waits COMOD_LOCAL_STOP_GRACE_S [10]
# seconds, then sends SIGKILL to what is left.
set -uo pipefail

TEMP_DIR=${COMOD_LOCAL_TEMP_DIR:-/tmp/comod-ray}
case $TEMP_DIR in /*) ;; *) echo "down.sh: COMOD_LOCAL_TEMP_DIR must be an absolute path" >&2; exit 1 ;; esac
TEMP_DIR=$(realpath -m -- "$TEMP_DIR")   # no trailing or doubled slashes, no /./ or /../
# every process mentioning / or /tmp would be everything: refuse a temp dir that is not the cluster's own
case ${TEMP_DIR:-/} in
  / | /tmp | /var/tmp | /dev/shm | /home | /root | /usr | /var)
    echo "down.sh: COMOD_LOCAL_TEMP_DIR=${COMOD_LOCAL_TEMP_DIR} would match processes that are not the cluster's; give the folder up.sh used, e.g. /tmp/comod-ray" >&2
    exit 1 ;;
esac
GRACE_S=${COMOD_LOCAL_STOP_GRACE_S:-10}

# The processes mentioning TEMP_DIR, then their descendants (parent ids from /proc/PID/stat).
declare -A parent_of=()
targets=()
for dir in /proc/[0-9]*; do
  pid=${dir#/proc/}
  [ "$pid" = $$ ] || [ "$pid" = "$PPID" ] && continue
  { stat=$(<"$dir/stat"); } 2>/dev/null || continue
  rest=${stat##*) }            # fields after "PID (comm) "
  read -r _ ppid _ <<<"$rest"
  parent_of[$pid]=$ppid
  { mapfile -d '' args <"$dir/cmdline"; } 2>/dev/null || continue
  [[ " ${args[*]} " == *"$TEMP_DIR/"* || " ${args[*]} " == *"$TEMP_DIR "* || " ${args[*]} " == *"$TEMP_DIR="* ]] && targets+=("$pid")
done
declare -A chosen=()
for pid in "${targets[@]}"; do chosen[$pid]=1; done
grew=1
while [ $grew = 1 ]; do
  grew=0
  for pid in "${!parent_of[@]}"; do
    if [ -z "${chosen[$pid]:-}" ] && [ -n "${chosen[${parent_of[$pid]}]:-}" ]; then chosen[$pid]=1; grew=1; fi
  done
done
pids=("${!chosen[@]}")

running() {  # a process that exists and is not a zombie waiting to be reaped
  local stat
  { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

if [ ${#pids[@]} -eq 0 ]; then
  echo "no local cluster running under $TEMP_DIR"
else
  kill -TERM "${pids[@]}" 2>/dev/null
  for _ in $(seq 1 $((GRACE_S * 5))); do   # GRACE_S seconds to exit cleanly, then SIGKILL
    alive=()
    for pid in "${pids[@]}"; do running "$pid" && alive+=("$pid"); done
    [ ${#alive[@]} -eq 0 ] && break
    sleep 0.2
  done
  [ ${#alive[@]} -gt 0 ] && kill -KILL "${alive[@]}" 2>/dev/null
  echo "stopped the local cluster under $TEMP_DIR (${#pids[@]} processes)"
fi
rm -f "$TEMP_DIR/comod-local.env"
