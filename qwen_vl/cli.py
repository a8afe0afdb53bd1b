"""`qwen-vl`: one console script for the project's tools, `qwen-vl <subcommand> [args...]`.

Subcommands map to "module:function" entry points (each a `main(argv) -> int`) imported only when run, so a
subcommand's heavy dependencies load only for it. A value may also be a dict of nested subcommands
(`qwen-vl convert openclip ...`). Adding a subcommand is one line in `SUBCOMMANDS`.
"""

import importlib
import sys

SUBCOMMANDS: dict = {
    "push": "qwen_vl.hub_upload.push:main",
    "train": "qwen_vl.recipes.train:main",
    "eval": "qwen_vl.recipes.evaluate:main",
    "demo": "qwen_vl.demo.run:main",
    "serve": "qwen_vl.serving.openai_server:main",
    "web": "qwen_vl.serving.web_demo:main",
    "convert": {
        "openclip": "qwen_vl.hub_upload.convert_openclip:main",
        "official": "qwen_vl.hub_upload.convert_official:main",
    },
}


def _usage(prog: str, commands: dict) -> str:
    return f"usage: {prog} {{{','.join(commands)}}} [args...]\n       {prog} <subcommand> --help for its options\n"


def dispatch(commands: dict, argv: list[str], prog: str = "qwen-vl") -> int:
    """Run the entry point that `argv[0]` names in `commands` with the remaining arguments; returns the exit code."""
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage(prog, commands))
        return 0
    if not argv:
        sys.stderr.write(_usage(prog, commands) + f"{prog}: error: a subcommand is required\n")
        return 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        sys.stderr.write(_usage(prog, commands) + f"{prog}: error: unknown subcommand {name!r}\n")
        return 2
    target = commands[name]
    if isinstance(target, dict):
        return dispatch(target, rest, f"{prog} {name}")
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if module_name == error.name or module_name.startswith(f"{error.name}."):
            reason = f"{module_name} is not part of this installation"
        else:
            reason = f"it needs {error.name!r}; install the extras (e.g. `pip install qwen-vl-hf[convert]`)"
        sys.stderr.write(f"{prog} {name}: unavailable: {reason}.\n")
        return 1
    return getattr(module, function_name)(rest) or 0


def main(argv: list[str] | None = None) -> int:
    return dispatch(SUBCOMMANDS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
