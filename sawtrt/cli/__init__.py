"""`sawtrt` command line: a thin Click layer over the Python API.

Each command lives in its own module here and is listed in COMMANDS; modules are imported only
when their command runs, so `sawtrt kv-plan` does not pay for the runtime or the server.
"""
from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" (relative to this package)
COMMANDS = {
    "kv-plan": "kv_plan:kv_plan",
    "bench": "bench:bench",
    "build": "build:build",
    "generate": "generate:generate",
    "serve": "serve:serve",
    "client": "client:client",
    "eval": "eval:eval_cmd",
}


def positive_ints(text: str, what: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; click.BadParameter naming `what` for anything else."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{what} must be >= 1")
    return values


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="sawtrt")
def main():
    """sawtrt: SAW-INT4 (block-diagonal Hadamard + token-wise INT4) KV cache for TensorRT serving."""


if __name__ == "__main__":
    main()
