"""Every script's command line (issue 28): `SCRIPT --help` and `SCRIPT COMMAND --help` exit 0 with the
commands / that command's flags, and out-of-range numbers get one line and a non-zero exit before any work.
Run in-process (each main(argv) stops in argument parsing), parametrised over the scripts."""
import importlib
import os
import re
import subprocess
import sys

import pytest

SCRIPTS = ["mobileclip", "catlip", "samclip", "reinforce", "fastfill", "tic", "subclone", "dense", "transfer",
           "cliptex"]


def run(capsys, script, argv):
    """(exit code, stdout, stderr) of script.main(argv)."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def commands(capsys, script) -> list[str]:
    code, out, err = run(capsys, script, ["--help"])
    assert code == 0 and "Traceback" not in out + err, err
    listed = out.split("commands:")[1].strip().splitlines() if "commands:" in out else []
    return [line.split()[0] for line in listed if line.startswith("  ")]


def flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_of_every_script_and_command(script, capsys):
    names = commands(capsys, script)
    seen = {}
    for name in names or [None]:
        code, out, err = run(capsys, script, ([name] if name else []) + ["--help"])
        assert code == 0 and "Traceback" not in out + err and out.startswith("usage:"), (name, err[-300:])
        assert len(out.split("\n\n")[1].strip()) > 40  # the description: a docstring's first paragraph
        seen[name] = flags(out.split("options:")[1])
    if len(seen) > 1:  # commands show their own flags, not all of them
        assert len(set(map(frozenset, seen.values()))) > 1, f"{script}: every command lists the same flags"


BAD = [("--batch-size", "0", "must be >= 1"), ("--steps", "-5", "must be >= 0"), ("--lr", "-0.1", "must be >= 0"),
       ("--workers", "-1", "must be >= 0"), ("--max-skip-frac", "1.5", "must be between 0 and 1")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_of_range_flags_get_one_line(script, capsys):
    checked = 0
    for name in commands(capsys, script) or [None]:
        prefix = [name] if name else []
        own = flags(run(capsys, script, prefix + ["--help"])[1])
        for flag, value, msg in BAD:
            if flag in own:
                code, out, err = run(capsys, script, prefix + [flag, value])
                assert code != 0 and err.strip() == f"error: {flag} {value}: {msg}", (script, name, flag, err[-300:])
                checked += 1
    assert checked > 0


def test_help_into_a_closed_pipe_is_quiet():
    """`SCRIPT --help | head -1`: the reader may leave before the help is written. The script then stops as Unix
    tools do (SIGPIPE), with no BrokenPipeError traceback. The read end is closed before the child writes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "tic.py", "--help"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait()
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-300:]
