#!/usr/bin/env bash
# vqav2 with IVTP (or METHOD) at TOKENS visual tokens; see run.sh for the environment variables.
# Usage: bash scripts/v1_5/eval/vqav2.sh TOKENS [extra ivtp eval args...]
exec bash "$(dirname "$0")/run.sh" vqav2 "$@"
