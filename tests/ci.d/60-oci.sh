#!/usr/bin/env bash
# Stage: `oci://` models against a real registry (tests/e2e/oci.rs): Debian's docker-registry on
# 127.0.0.1 with htpasswd Basic auth and with Bearer tokens (tests/e2e/oci_token_server.py),
# modelcars built by packaging/modelcar.sh (umoci) and pushed by skopeo. The tests start and stop
# every registry and token server themselves. Installs the Debian packages it needs when root;
# skips (saying why) only where it cannot. About 1-2 minutes warm.
set -euo pipefail
cd "$(dirname "$0")/../.."

# tool:Debian package
need="docker-registry:docker-registry skopeo:skopeo umoci:umoci htpasswd:apache2-utils openssl:openssl python3:python3"
missing=()
for pair in $need; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "60-oci: installing ${missing[*]}"
        # policy-rc.d: the package must not start a registry of its own (the tests start theirs).
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        rm -f /usr/sbin/policy-rc.d
    else
        echo "skipped: needs ${missing[*]} (Debian packages); run as root with apt-get to install them"
        exit 0
    fi
fi
cargo test -p lora --test e2e oci::oci_ -- --ignored
