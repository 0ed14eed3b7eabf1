import pytest

from tests.conftest import EXAMPLES


def test_dry_run_prints_task_yaml(cli) -> None:
    result = cli("submit", str(EXAMPLES / "train-single-gpu.yaml"), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "accelerators: A6000:1" in result.stdout
    # Off the box (no inventory, no GPU): one line that says the GPU request went unchecked.
    assert result.stderr in ("", result.stderr.splitlines()[0] + "\n")
    assert result.stderr == "" or "the GPU request is not checked here" in result.stderr


@pytest.mark.parametrize("command", ["submit", "queue", "reap", "observe", "doctor", "report"])
def test_every_command_says_its_exit_codes_and_shows_no_type_names(cli, command: str) -> None:
    out = cli(command, "--help").stdout
    assert "Exit" in out, command
    assert "float range" not in out and "<str>" not in out and "<file>" not in out


@pytest.mark.parametrize(
    "args",
    [
        ["queue", "--timeout", "inf"],
        ["queue", "--timeout", "nan"],
        ["queue", "--watch", "--interval", "nan"],
        ["doctor", "--timeout", "1e309"],
        ["submit", "examples/cpu-only.yaml", "--wait", "-1"],
    ],
)
def test_numeric_options_refuse_non_finite_and_out_of_range(cli, args: list[str]) -> None:
    result = cli(*args)
    assert result.exit_code == 2
    assert "seconds" in result.stderr and "internal error" not in result.stderr


def test_shell_completion_is_typers_own(cli) -> None:
    assert "--install-completion" in cli("--help").stdout
