"""The documentation matches the CLI: every `tfbitmeta` command in README's code blocks exists and its flags parse,
the CLI docstring lists every command, and no comment points outside the repository for its explanation."""
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from tfbitmeta import cli

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """Every `tfbitmeta ...` invocation in README's fenced code blocks, as argument lists (without `tfbitmeta`)."""
    blocks, current, lang = [], None, None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang in ("bash", "sh", "shell", "console"):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if "tfbitmeta " not in line:
                continue
            tokens = shlex.split(line, comments=True)
            args = tokens[tokens.index("tfbitmeta") + 1:]
            commands.append([a for a in args if a != "..."])
    return commands


COMMANDS = readme_commands()


def test_readme_has_commands_for_every_cli_command():
    assert len(COMMANDS) >= 10
    assert {c[0] for c in COMMANDS} == set(cli.main.commands), "a command is missing from README (or unknown)"


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_exists_and_its_flags_parse(args):
    assert args[0] in cli.main.commands, f"README uses unknown command {args[0]!r}"
    r = CliRunner().invoke(cli.main, [*args, "--help"])
    assert r.exit_code == 0, f"tfbitmeta {' '.join(args)}: {r.output}"
    assert r.output.startswith(f"Usage: main {args[0]}")


def test_cli_docstring_lists_every_command():
    doc = cli.__doc__
    missing = [name for name in cli.main.commands if f"``{name}``" not in doc]
    assert not missing, missing


def test_unknown_flag_in_a_readme_style_command_is_caught():
    """The check above can fail: a misspelt flag is a usage error even with --help."""
    r = CliRunner().invoke(cli.main, ["train", "--datset", "digits", "--help"])
    assert r.exit_code == 2 and "No such option" in r.output


NOTES = re.compile(r"mebqat-spec|stack-facts|harmony-design|harmony-diagnosis|android-build|android-apk\.md|"
                   r"datasets\.md|shared/notes")


def test_no_reference_to_documents_outside_the_repository():
    files = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".kt", ".kts", ".sh", ".toml"}
             and not any(part.startswith(".") or part in {"build-ci", "node_modules"} for part in p.relative_to(ROOT).parts)]
    files.append(ROOT / ".ci" / "run")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if NOTES.search(line) and p.name != "test_docs.py"]
    assert not hits, hits


def test_cli_import_and_group_help_need_no_tensorflow():
    """`tfbitmeta --help` stays instant: the option registries are imported only when a command needs them."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from tfbitmeta.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('tensorflow', 'tensorflow_federated') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
