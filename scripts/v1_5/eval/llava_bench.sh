#!/usr/bin/env bash
# llava_bench with IVTP (or METHOD) at TOKENS visual tokens; see run.sh for the environment variables.
# Usage: bash scripts/v1_5/eval/llava_bench.sh TOKENS [extra ivtp eval args...]
exec bash "$(dirname "$0")/run.sh" llava_bench "$@"
