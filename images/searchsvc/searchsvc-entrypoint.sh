#!/bin/sh
# searchsvc leaf [--leaf-id N] [--port P] [leaf args...]: builds leaf N's index in the pod
#   (deterministic, so every pod of leaf N serves the same data), then serves it on 0.0.0.0.
# searchsvc root --leaf HOST:PORT [--leaf ...] [--port P] [root args...]
# anything else is run as given.
set -eu
role=${1:-leaf}
[ $# -gt 0 ] && shift
case $role in
  leaf)
    id=0 port=8080
    while [ $# -gt 0 ]; do
      case $1 in
        --leaf-id) id=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        *) break ;;
      esac
    done
    dir=/var/lib/searchsvc/leaf-$id
    if [ ! -d "$dir" ]; then
      mkdir -p "$dir"
      python3 -c 'import sys; from pathlib import Path; from searchsvc.index import build_index; build_index(Path(sys.argv[1]), int(sys.argv[2]))' "$dir" "$id"
    fi
    exec python3 -m searchsvc.leaf --index "$dir" --host 0.0.0.0 --port "$port" "$@" ;;
  root)
    exec python3 -m searchsvc.root --host 0.0.0.0 --port 8080 "$@" ;;
  *)
    exec "$role" "$@" ;;
esac
