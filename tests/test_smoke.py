from tests.conftest import EXAMPLES


def test_dry_run_prints_task_yaml(cli) -> None:
    result = cli("submit", str(EXAMPLES / "train-single-gpu.yaml"), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "accelerators: A6000:1" in result.stdout
    assert result.stderr == ""
