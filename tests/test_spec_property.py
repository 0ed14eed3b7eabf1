"""Property: no YAML text, however odd, makes spec loading raise anything but a SpecError."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deskgpu.config import HostConfig
from deskgpu.errors import SpecError
from deskgpu.spec import JobSpec, spec_from_located
from deskgpu.yamlio import load_located

CONFIG = HostConfig(gpus={"A6000": 4})
FIELDS = [
    "name",
    "gpus",
    "image",
    "uv",
    "workdir",
    "setup",
    "run",
    "env",
    "interactive",
    "idle_timeout",
    "keep",
    "infra",
    "gpu",
    "<<",
    "1",
    "",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["A6000:2", "2", "0", "2h", "30m", "x" * 60, "k8s"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
documents = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8)


def _load(text: str | bytes) -> JobSpec | None:
    try:
        return spec_from_located(load_located(text, "job.yaml"), CONFIG, "alice")
    except SpecError as exc:
        assert exc.lines() and all(line.startswith("job.yaml") for line in exc.lines())
        return None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(documents)
def test_structured_yaml_never_raises_anything_but_spec_error(doc: dict[str, object]) -> None:
    spec = _load(yaml.safe_dump(doc))
    if spec is not None:
        assert spec.name == doc["name"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("name:gpus run-&*!|>'\"\t\n []{}#%@`,?0123456789")),
        max_size=120,
    )
)
def test_yaml_shaped_noise_never_raises_anything_but_spec_error(text: str) -> None:
    _load(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_spec_error(data: bytes) -> None:
    _load(data)


@settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    deadline=None,
)
@given(documents)
def test_cli_never_prints_a_traceback(tmp_path_factory, doc: dict[str, object]) -> None:
    from typer.testing import CliRunner

    from deskgpu.cli import app

    path = tmp_path_factory.mktemp("prop") / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["submit", str(path), "--dry-run"], catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code in (0, 2)
    assert "Traceback" not in result.stderr + result.stdout
