#!/bin/sh
# Apply the sidecar settings, log to stdout, send one demo message once the sidecar answers
# (SEND_DEMO=0 to skip), and run Postfix in the foreground.
set -eu
grep -v -e '^#' -e '^$' /etc/postfix-sidecar/sidecar.cf | while IFS= read -r line; do
    postconf -e "$line"
done
postconf -e "maillog_file = /dev/stdout" "inet_interfaces = loopback-only" \
    "myhostname = $(hostname -f)" "mydestination =" "inet_protocols = ipv4"
postconf -M postlog/unix-dgram="postlog unix-dgram n - n - 1 postlogd"
if [ "${SEND_DEMO:-1}" = 1 ]; then
    (
        # Postfix up (its pickup service) and the sidecar answering.
        until [ -e /var/spool/postfix/public/pickup ] && nc -z 127.0.0.1 2525; do sleep 1; done
        printf 'From: demo@example.net\nTo: a@example.test, b@example.org\nSubject: demo\n\nThrough the sidecar.\n' |
            sendmail -f demo@example.net a@example.test b@example.org
    ) &
fi
# `postfix start-fg` exits 1 without a word on a bad configuration: check says why.
postfix check
exec postfix start-fg
