"""``siterecovery demo``: a throwaway vault, three machines under load, replication, drills, and
the whole life of two of them: failover, commit, reprotect, failback, reprotect again."""

from __future__ import annotations

from pathlib import Path

import typer

from siterecovery.entrypoints.cli.render import console


def demo(
    report: Path = typer.Option(None, help="Write the JSON report here."),
    machines: int = typer.Option(3, min=1, max=10, help="Number of machines (2 disks each)."),
    disk_size_mib: int = typer.Option(1024, min=64, help="Virtual size of each disk in MiB."),
    data_mib: int = typer.Option(160, min=1, help="Real data written into each disk before replication."),
    steady: float = typer.Option(60.0, min=10.0, help="Seconds of continuous replication to measure RPO."),
    crash_frequency: str = typer.Option("15s", help="Crash-consistent point frequency of the demo policy."),
    workdir: Path = typer.Option(None, help="Work here instead of a temporary directory (kept afterwards)."),
    keep: bool = typer.Option(False, help="Keep the temporary directory."),
) -> None:
    """Run the demo and check every step; exits non-zero if any check fails."""
    from siterecovery.demo.run import DemoConfig, run_demo

    mib = 1024 * 1024
    if data_mib >= disk_size_mib:
        raise typer.BadParameter(f"--data-mib ({data_mib}) must be below --disk-size-mib ({disk_size_mib}).")
    cfg = DemoConfig(
        machines=machines,
        disk_size=disk_size_mib * mib,
        data_bytes=data_mib * mib,
        crash_frequency=crash_frequency,
        steady_seconds=steady,
        workdir=workdir,
        keep=keep,
    )
    result = run_demo(cfg, console, report)
    if not result.passed:
        failed = [c["name"] for c in result.checks if not c["passed"]]
        console.print(f"[red]{len(failed)} check(s) failed:[/red] {', '.join(failed)}")
        raise typer.Exit(1)
    console.print(f"[green]all {len(result.checks)} checks passed[/green]")
