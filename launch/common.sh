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

# The command line as every launch script reads it: --dry-run, -h/--help (the usage of the file
# given first), `--name=value` and `--name value` (the script's set_option NAME VALUE), switches
# (the script's set_switch NAME, which returns 1 for names that take a value), bare words (the
# script's set_word WORD) and, where the script sets TAKES_TRAINER_ARGS=1, `--` followed by flags
# for the trainer (EXTRA_ARGS).
# shellcheck disable=SC2034  # EXTRA_ARGS is read by the sourcing script.
parse_command_line() {
  local usage_file=$1 hint="launch/${1##*/}"
  shift
  while (( $# )); do
    case "$1" in
      --) (( ${TAKES_TRAINER_ARGS:-0} )) || die "unexpected argument '--' (see ${hint} --help)"
          shift; EXTRA_ARGS=("$@"); return 0 ;;
      --dry-run) DRY_RUN=1 ;;
      -h|--help) print_usage "${usage_file}"; exit 0 ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      --*) if ! set_switch "$1"; then set_option "$1" "${2-}"; shift; fi ;;
      *) set_word "$1" "${hint}" ;;
    esac
    shift
  done
}

# Defaults of the parse_command_line hooks; a script redefines those it needs after sourcing.
set_switch() {
  return 1
}

set_word() {
  die "unexpected argument '$1' (see $2 --help)"
}
