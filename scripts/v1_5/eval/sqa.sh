#!/usr/bin/env bash
# sqa with IVTP (or METHOD) at TOKENS visual tokens; see run.sh for the environment variables.
# Usage: bash scripts/v1_5/eval/sqa.sh TOKENS [extra ivtp eval args...]
exec bash "$(dirname "$0")/run.sh" sqa "$@"
