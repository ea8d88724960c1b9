#!/usr/bin/env bash
# Assembles the container image's whole root file system into ROOT (run by the Dockerfile's
# builder stage; the runtime stage is `FROM scratch` plus this tree):
#   /usr/local/bin/stepflow-lb          the binary, stripped
#   the shared libraries it loads       exactly ldd's closure, at the paths ldd names
#   the dynamic loader                  the binary's PT_INTERP
#   /etc/ssl/certs/ca-certificates.crt  the CA bundle (+ OpenSSL's default-path symlink to it)
#   /etc/passwd, /etc/group             UID/GID 1000 `stepflow` only
#   /etc/nsswitch.conf                  `hosts: files dns`, as Debian orders getaddrinfo
# Then checks the tree: the loader inside it must resolve every library (no "not found") and
# the binary must start there (`--help`).
#   scripts/image-rootfs.sh BINARY ROOT
set -euo pipefail
bin="${1:?usage: $0 BINARY ROOT}"
root="${2:?usage: $0 BINARY ROOT}"
rm -rf "$root"
install -D -m 0755 -s "$bin" "$root/usr/local/bin/stepflow-lb"

# ldd prints "name => /path (addr)" per library and "/path/ld-linux... (addr)" for the loader;
# linux-vdso has no file. Copy each file's content (cp -L: through Debian's .so symlinks) to
# the path ldd printed, so the loader finds it in its default search directories.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
if ldd "$bin" | grep -q 'not found'; then
  ldd "$bin" >&2
  echo "image-rootfs.sh: the builder itself lacks a library $bin links" >&2
  exit 1
fi
for lib in $libs; do
  install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done

install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# SSL_CTX_set_default_verify_paths (TLS to workers without --upstream-ca) reads
# OPENSSLDIR/cert.pem; Debian's OPENSSLDIR is /usr/lib/ssl.
mkdir -p "$root/usr/lib/ssl"
ln -s /etc/ssl/certs/ca-certificates.crt "$root/usr/lib/ssl/cert.pem"

printf 'stepflow:x:1000:1000:stepflow-lb:/nonexistent:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'stepflow:x:1000:\n' >"$root/etc/group"
# Debian's order: /etc/hosts (Kubernetes hostAliases) before DNS, not left to glibc's default.
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"

# The check against the assembled tree: its own loader, its own library directories.
interp=$(ldd "$bin" | awk '$1 ~ /^\// { print $1 }')
listing=$(chroot "$root" "$interp" --list /usr/local/bin/stepflow-lb) || {
  echo "$listing" >&2
  echo "image-rootfs.sh: the loader cannot load the binary inside $root" >&2
  exit 1
}
if grep -q 'not found' <<<"$listing"; then
  echo "$listing" >&2
  echo "image-rootfs.sh: a shared library is missing from $root (see the lines above)" >&2
  exit 1
fi
chroot --userspec=1000:1000 "$root" /usr/local/bin/stepflow-lb --help >/dev/null
echo "image-rootfs.sh: $root holds $(find "$root" -type f | wc -l) files," \
  "$(du -sh "$root" | cut -f1)" >&2
