#!/usr/bin/env bash
# Start the services the tests need when they are not running (PID 1 may not be systemd).
set -euo pipefail
# Nothing long-lived yet: the local registry is started per test session by the harness itself.
exit 0
