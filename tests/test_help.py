"""Every command has --help text, and every argument and option of every command says what it is.

Commands are taken from the app itself (`typer.main.get_command`), so a new command is covered
as soon as it is registered; COMMANDS adds the first words each documented one must show."""

import pytest
import typer

from ce_cli.cli.app import app
from ce_cli.cli.main import register_commands

register_commands()

COMMANDS = {
    "grad": "Softmax cross-entropy",
    "binary": "Sigmoid binary cross-entropy",
    "batch": "JSON-lines manifest",
}


def click_group():
    return typer.main.get_command(app)


def test_top_level_help_lists_every_command(invoke):
    result = invoke(["--help"])
    assert result.exit_code == 0, result.output
    assert "Verify cross-entropy losses and gradients" in result.stdout
    assert "Exit codes" in result.stdout
    for name in COMMANDS:
        assert name in result.stdout


def test_the_documented_commands_are_registered():
    assert set(COMMANDS) <= set(click_group().commands)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("name", sorted(set(COMMANDS) | set(click_group().commands)))
def test_command_help(invoke, name, flag):
    result = invoke([name, flag])
    assert result.exit_code == 0, result.output
    command = click_group().commands[name]
    assert command.help and len(command.help.split()) >= 5, f"{name} has no description"
    assert COMMANDS.get(name, "") in result.stdout
    assert "Exit codes:" in result.stdout
    for param in click_group().commands[name].params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                assert opt in result.stdout, f"{name} --help does not show {opt}"


def _params():
    group = click_group()
    return [pytest.param("ce-check", group.params, id="ce-check")] + [
        pytest.param(name, command.params, id=name) for name, command in group.commands.items()]


@pytest.mark.parametrize("command, params", _params())
def test_every_parameter_has_help(command, params):
    assert params or command == "ce-check"
    for param in params:
        text = getattr(param, "help", None)
        assert text and text.strip(), f"{command}: {param.name} has no help text"
        assert len(text) > 10, f"{command}: {param.name}: help text too short: {text!r}"


def test_batch_help_documents_the_formats_and_the_exit_codes(invoke):
    out = " ".join(invoke(["batch", "--help"]).stdout.split())
    for word in ("--format", "jsonl", "table", "--junit-xml", "--fail-fast", "--jobs",
                 "relative to the manifest"):
        assert word in out
    assert "2 a case could not run" in out


ALL = ("grad", "binary", "linear", "explain", "stress", "batch")


@pytest.mark.parametrize("name", ALL)
def test_help_reads_at_80_columns(invoke, name):
    """Usage line with plain metavars, every line within 80 columns, examples in the epilog."""
    out = invoke([name, "--help"], env={"COLUMNS": "80"}).stdout
    usage = out.splitlines()[0]
    assert usage.startswith(f"Usage: ce-check {name} [OPTIONS]")
    for bad in ("{", "<str>", "<float>", "<int>", "<path>"):
        assert bad not in usage and bad not in out.split("Examples:")[0].replace(
            "{logits}", "").replace("{labels}", "").replace("{grad}", "").replace(
            "{loss}", "").replace("{dtype}", "").replace("{reduction}", ""), (name, bad)
    too_long = [line for line in out.splitlines() if len(line) > 80]
    assert not too_long, too_long
    examples = out.split("Examples:")[1].split("Exit codes")[0]
    shown = [line.strip() for line in examples.splitlines() if line.strip()]
    assert 2 <= len(shown) <= 3 and all(line.startswith(f"ce-check {name}") for line in shown)


@pytest.mark.parametrize("name, args", [("grad", "LOGITS LABELS"), ("binary", "LOGITS LABELS"),
                                        ("linear", "HIDDEN WEIGHT LABELS"),
                                        ("batch", "MANIFEST")])
def test_required_arguments_show_plain(invoke, name, args):
    assert invoke([name, "--help"]).stdout.splitlines()[0].endswith(f"[OPTIONS] {args}")


def test_top_level_summaries_fit_80_columns(invoke):
    out = invoke(["--help"], env={"COLUMNS": "80"}).stdout
    listed = out.split("Commands:")[1].split("Exit codes")[0]
    rows = [line for line in listed.splitlines() if line.strip()]
    assert len(rows) == len(ALL)
    for line in rows:
        assert len(line) <= 80 and not line.endswith("..."), line
