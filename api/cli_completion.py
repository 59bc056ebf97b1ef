"""Shell completion for `lessor`, written from its argparse parser (so it cannot drift from the
commands): subcommands, each one's flags, and its first argument — model names come from
`lessor models --names`, asked of the daemon the words typed so far point at (--admin, --config).
zsh runs the same function through bashcompinit."""

from __future__ import annotations

import argparse

# Flags whose value is a file or a model; other flags that take a value complete nothing.
FILE_FLAGS = ("--config",)
MODEL_FLAGS = ("--model",)

BASH = r'''_lessor_models() {
    local i args=()
    for ((i = 1; i < ${#COMP_WORDS[@]} - 1; i++)); do
        case "${COMP_WORDS[i]}" in
            --admin|--config|--token) args+=("${COMP_WORDS[i]}" "${COMP_WORDS[i+1]}") ;;
        esac
    done
    lessor models --names "${args[@]}" 2>/dev/null
}

_lessor() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" flags="" what="" cmd="" i
    COMPREPLY=()
    # The command: the first word that is neither an option given before it nor such an option's value.
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            @GLOBAL_VALUE_FLAGS@) ((i++)) ;;
            -*) ;;
            *) cmd="${COMP_WORDS[i]}"; break ;;
        esac
    done
    if [[ -z "$cmd" ]]; then
        case "$prev" in
            @FILE_FLAGS@) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            @GLOBAL_VALUE_FLAGS@) return ;;
        esac
        COMPREPLY=($(compgen -W "@COMMANDS@" -- "$cur"))
        return
    fi
    case "$cmd" in
@CASES@
    esac
    case "$prev" in
        @FILE_FLAGS@) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        @MODEL_FLAGS@) COMPREPLY=($(compgen -W "$(_lessor_models)" -- "$cur")); return ;;
        @VALUE_FLAGS@) return ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
    elif [[ "$what" == "@model" ]]; then
        COMPREPLY=($(compgen -W "$(_lessor_models)" -- "$cur"))
    elif [[ "$what" == "@file" ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    elif [[ -n "$what" ]]; then
        COMPREPLY=($(compgen -W "$what" -- "$cur"))
    fi
}

complete -F _lessor lessor
'''


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _first_argument(sub: argparse.ArgumentParser) -> str:
    """What the first positional takes: @model, @file, its choices, or nothing."""
    positionals = [a for a in sub._actions if not a.option_strings]
    if not positionals:
        return ""
    first = positionals[0]
    if first.choices:
        return " ".join(first.choices)
    return {"model": "@model", "file": "@file"}.get(first.dest, "")


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    subs = _subcommands(parser)
    top_flags = [s for a in parser._actions if not isinstance(a, argparse._SubParsersAction) for s in a.option_strings]
    top_values = [s for a in parser._actions if a.option_strings and a.nargs != 0 and not isinstance(a, argparse._VersionAction)
                  for s in a.option_strings]
    cases, value_flags = [], set[str]()
    for name, sub in subs.items():
        flags = [s for a in sub._actions for s in a.option_strings]
        value_flags.update(s for a in sub._actions if a.option_strings and a.nargs != 0 for s in a.option_strings)
        cases.append(f'        {name}) flags="{" ".join(flags)}"; what="{_first_argument(sub)}" ;;')
    others = sorted(value_flags - set(FILE_FLAGS) - set(MODEL_FLAGS)) or ["--"]
    script = (BASH.replace("@COMMANDS@", " ".join([*subs, *top_flags]))
              .replace("@GLOBAL_VALUE_FLAGS@", "|".join(top_values) or "--")
              .replace("@CASES@", "\n".join(cases))
              .replace("@FILE_FLAGS@", "|".join(FILE_FLAGS))
              .replace("@MODEL_FLAGS@", "|".join(MODEL_FLAGS))
              .replace("@VALUE_FLAGS@", "|".join(others)))
    if shell == "zsh":  # zsh's bash emulation runs the same function: one script to keep true
        return "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n" + script
    return script
