"""The console script's group builds only the command invoked (cli/app.py LazyCommands): its help
lists every command from COMMANDS without building any, and reads exactly as the group with every
command built (what the tests' CliRunner and Typer build); the invoked command is the same either
way. Which modules a fresh process imports: tests/test_startup.py."""

from __future__ import annotations

import copy

import pytest
import typer

from ce_cli.cli import app as app_module
from ce_cli.cli.app import COMMANDS, LazyCommands, app, build_command


def lazy_app() -> typer.Typer:
    """`app` as the console script has it: no command registered, so its group builds each on
    demand (conftest registered them all on `app`)."""
    lazy = copy.copy(app)
    lazy.registered_commands = []
    return lazy


def lazy_group():
    return typer.main.get_command(lazy_app())


def eager_group():
    group = typer.main.get_command(app)
    assert all(group.commands.is_built(name) for name in COMMANDS)  # conftest registered them
    return group


def test_lazy_group_starts_empty():
    """The probe can fail: this group has no command built, the eager one has all of them."""
    lazy = lazy_group().commands
    assert list(lazy) == list(COMMANDS) and not any(lazy.is_built(n) for n in COMMANDS)
    assert list(eager_group().commands) == list(COMMANDS)


def test_each_command_has_its_listed_line():
    """The line `ce-check --help` shows for a command is the built command's own short help."""
    for name, line in COMMANDS.items():
        command = build_command(name)
        assert command.name == name
        assert command.get_short_help_str(limit=200) == line
        assert eager_group().commands[name].get_short_help_str(limit=200) == line


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"], ["--version"], ["gard"],
                                  *([name, "--help"] for name in COMMANDS)],
                         ids=lambda a: " ".join(a) or "no arguments")
def test_lazy_output_is_the_eager_output(runner, monkeypatch, args):
    """Help, version, a mistyped command ("did you mean"), each command's help: the same text
    and exit code; only the invoked command is built."""
    built: list[str] = []

    def spy(name: str):
        built.append(name)
        return build_command(name)

    env = {"COLUMNS": "80", "NO_COLOR": "1"}
    eager = runner.invoke(app, args, env=env, prog_name="ce-check")
    assert built == []
    monkeypatch.setattr(app_module, "build_command", spy)
    lazy = runner.invoke(lazy_app(), args, env=env, prog_name="ce-check")
    assert (lazy.exit_code, lazy.output) == (eager.exit_code, eager.output)
    assert lazy.output.strip()
    assert built == [name for name in args[:1] if name in COMMANDS]


def test_listing_builds_none():
    commands = LazyCommands({})
    assert "grad" in commands and "nope" not in commands and len(commands) == len(COMMANDS)
    assert commands.short_help("grad", 40) == COMMANDS["grad"]
    assert not commands.is_built("grad")
    assert commands["grad"].name == "grad" and commands.is_built("grad")
    with pytest.raises(KeyError):
        commands["nope"]


def test_added_and_removed_commands():
    """A command added to the group is listed after COMMANDS; a removed one is no longer listed."""
    commands = LazyCommands({})
    extra = build_command("grad")
    commands["extra"] = extra
    assert list(commands)[-1] == "extra" and commands["extra"] is extra
    del commands["batch"]
    assert "batch" not in commands and "batch" not in list(commands)
