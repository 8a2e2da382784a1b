#!/bin/sh
# BCC compiles its probes against /lib/modules/$(uname -r)/build; the image carries Debian's
# newest headers, so link them for whatever kernel the node runs (as scripts/setup.sh does).
set -eu
k=$(uname -r)
if [ ! -e "/lib/modules/$k/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1)
  if mkdir -p "/lib/modules/$k" 2>/dev/null; then
    ln -sfn "$hdr" "/lib/modules/$k/build"
    ln -sfn "${hdr%-amd64}-common" "/lib/modules/$k/source"
  else
    echo "qtrace-agent: /lib/modules is read-only and has no headers for $k" >&2
  fi
fi
exec "$@"
