"""The doctor table (rich). Only the CLI imports this; the core never imports rich."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from deskgpu.doctor.checks import COMPONENTS, FAIL, OK, SKIP, WARN
from deskgpu.doctor.report import DoctorResult

_STYLE = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


def render(result: DoctorResult, console: Console) -> None:
    """One table, grouped by component, then the notes and a summary line."""
    table = Table(show_header=True, header_style="bold", expand=False, show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold")
    order = list(COMPONENTS)
    checks = sorted(
        result.checks,
        key=lambda c: order.index(c.component) if c.component in order else len(order),
    )
    current = None
    fixes: list[tuple[str, str]] = []
    for check in checks:
        if check.component != current:
            if current is not None:
                table.add_section()
            current = check.component
            table.add_row(Text(COMPONENTS.get(current, current), style="bold"), "", "")
        body = Text(check.detail)
        if check.fix:
            fixes.append((check.id, check.fix))
            body.append(f"\nfix [{len(fixes)}] below", style="bold")
        name = check.id.split(".", 1)[1] if "." in check.id else check.id
        table.add_row(f"  {name}", Text(check.status.upper(), style=_STYLE[check.status]), body)
    console.print(table)
    # Fixes are commands and URLs: each on a line of its own, never wrapped inside the table,
    # so it can be copied whole (the terminal folds a long one; no newline is inserted).
    for i, (check_id, fix) in enumerate(fixes, 1):
        line = Text(f"[{i}] {check_id}: ", style="bold")
        line.append(fix)
        console.print(line, soft_wrap=True)
    for note in result.notes:
        console.print(Text(f"note: {note}", style="dim"), soft_wrap=True)
    style = "bold red" if result.exit_status else "bold green"
    console.print(Text(result.summary_line(), style=style), soft_wrap=True)
