#!/bin/sh
# gather-libs.sh ROOT BINARY...: copies into ROOT what the binaries need at
# run time and nothing else: the shared libraries they link (as ldd resolves
# them, with the dynamic loader), the CA certificates, a passwd/group entry
# for the non-root user 65532, and the name service configuration. Runs in
# the images' `libs` stage (a Debian base), see broker/Dockerfile.
set -eu
root=$1
shift
mkdir -p "$root/etc/ssl/certs" "$root/usr/share/ca-certificates"
for bin in "$@"; do
    ldd "$bin" | awk '/=>/ { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }' | while read -r lib; do
        [ -n "$lib" ] || continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
# The loader is looked up at its canonical path.
for ld in /lib64/ld-linux-x86-64.so.2 /lib/ld-linux-aarch64.so.1; do
    if [ -e "$ld" ]; then
        mkdir -p "$root$(dirname "$ld")"
        cp -L "$ld" "$root$ld"
    fi
done
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nringmq:x:65532:65532:ringmq:/var/lib/ringmq:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nringmq:x:65532:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
