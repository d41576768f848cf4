#!/usr/bin/env bash
# mmvet with IVTP (or METHOD) at TOKENS visual tokens; see run.sh for the environment variables.
# Usage: bash scripts/v1_5/eval/mmvet.sh TOKENS [extra ivtp eval args...]
exec bash "$(dirname "$0")/run.sh" mmvet "$@"
