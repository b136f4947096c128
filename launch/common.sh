# Helpers shared by the launch scripts (sourced, never run): one-line errors, shell quoting and
# the --dry-run switch. The sourcing script sets DRY_RUN (0 or 1) before calling `run`.
# shellcheck shell=bash

# Bad input: one line on stderr and exit 2, before anything is created or billed.
die() {
  echo "error: $*" >&2
  exit 2
}

# A failure while running (not the user's input): one line on stderr and exit 1.
fail() {
  echo "error: $*" >&2
  exit 1
}

# One word as a POSIX shell reads it back: plain words as they are, others in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A whole command on one line, each word quoted: what --dry-run prints.
command_line() {
  local word line=""
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  printf '%s\n' "${line}"
}

# Runs a command; under --dry-run prints it instead. Real runs echo it to stderr first.
run() {
  if (( DRY_RUN )); then
    command_line "$@"
    return 0
  fi
  echo "+ $(command_line "$@")" >&2
  "$@"
}

# Like `run`, but the command replaces the script, so signals (SIGTERM: save and stop) reach it.
run_exec() {
  if (( DRY_RUN )); then
    command_line "$@"
    exit 0
  fi
  echo "+ $(command_line "$@")" >&2
  exec "$@"
}

# Prints a script's leading comment block (its usage), without the '# '.
print_usage() {
  local line
  while IFS= read -r line; do
    [[ "${line}" == '#!'* ]] && continue
    [[ "${line}" == '#'* ]] || break
    line=${line#\#}
    printf '%s\n' "${line# }"
  done < "$1"
}

# Fails with the fix when a command the real run needs is not installed.
require_command() {
  command -v "$1" >/dev/null || die "$1 not found: $2"
}

# The jax version pinned in requirements.txt (the accelerator build must match it).
pinned_jax_version() {
  local line
  while IFS= read -r line; do
    if [[ "${line}" =~ ^jax(\[[a-z0-9,-]+\])?==([0-9][0-9a-z.]*) ]]; then
      printf '%s\n' "${BASH_REMATCH[2]}"
      return 0
    fi
  done < "$1"
  return 1
}
