"""The command line: --version, help text of every option, and errors as one line."""
import argparse
import os
import subprocess
import sys
import tomllib

import pytest

import nvfp4_jax
from nvfp4_jax import cli
from nvfp4_jax.errors import NVFP4Error
from tests.paths import TINY_LLAMA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = {"convert", "verify", "eval", "bench", "example"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _arguments(parser: argparse.ArgumentParser):
    skip = (argparse._HelpAction, argparse._SubParsersAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def test_version_is_the_package_version(capsys):
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"nvfp4-jax {declared}\n"
    assert nvfp4_jax.__version__ == declared


def test_every_option_of_every_subcommand_has_help_that_states_its_default():
    parser = cli.build_parser()
    subs = _subparsers(parser)
    assert set(subs) == SUBCOMMANDS
    for name, sub in {"": parser, **subs}.items():
        formatter = sub._get_formatter()
        for action in _arguments(sub):
            label = f"{name} {action.option_strings or action.dest}"
            assert action.help and action.help.strip(), f"{label}: no help"
            shown = formatter._expand_help(action)  # the text --help prints
            takes_default = action.option_strings and not isinstance(action, argparse._VersionAction)
            if takes_default or action.nargs == "?":
                assert "(default: " in shown, f"{label}: help does not state the default: {shown!r}"


def test_flag_defaults_read_off():
    convert = _subparsers(cli.build_parser())["convert"]
    (resume,) = [a for a in convert._actions if "--resume" in a.option_strings]
    assert convert._get_formatter()._expand_help(resume).endswith("(default: off)")


def _err_lines(capsys):
    return capsys.readouterr().err.splitlines()


def test_missing_source_is_one_error_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-src"
    rc = cli.main(["convert", str(missing), str(tmp_path / "out"), "--input-scale-constant", "1.0", "--quiet"])
    lines = _err_lines(capsys)
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_missing_calibration_is_one_error_line(tmp_path, capsys):
    rc = cli.main(["convert", str(TINY_LLAMA / "source"), str(tmp_path / "out"), "--quiet"])
    lines = _err_lines(capsys)
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("error: no calibration data"), lines


def test_entry_point_process_prints_no_traceback(tmp_path):
    missing = tmp_path / "no-such-src"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("NVFP4_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "nvfp4_jax.cli", "convert", str(missing), str(tmp_path / "out"),
                        "--input-scale-constant", "1.0"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], p.stderr


def _failing_verify(monkeypatch, exc):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_verify", fail)


def test_a_multi_line_message_becomes_one_line(monkeypatch, capsys):
    _failing_verify(monkeypatch, NVFP4Error("exclude list is not safe:\n  a\n  b"))
    assert cli.main(["verify", "x"]) == 2
    assert _err_lines(capsys) == ["error: exclude list is not safe:; a; b"]


def test_os_error_is_one_line(monkeypatch, capsys):
    _failing_verify(monkeypatch, FileNotFoundError(2, "No such file or directory", "/x/config.json"))
    assert cli.main(["verify", "x"]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/x/config.json" in lines[0]


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("a bug"), RuntimeError("a bug")])
def test_other_exceptions_keep_their_traceback(monkeypatch, exc):
    _failing_verify(monkeypatch, exc)
    with pytest.raises(type(exc)):
        cli.main(["verify", "x"])


def test_debug_variable_reraises_reported_errors(monkeypatch):
    monkeypatch.setenv("NVFP4_DEBUG", "1")
    _failing_verify(monkeypatch, NVFP4Error("reported"))
    with pytest.raises(NVFP4Error, match="reported"):
        cli.main(["verify", "x"])
