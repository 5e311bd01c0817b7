"""`hvd-abs bench NAME [ARGS]`: run one of the benchmarks in benchmarks/ (each prints JSON)."""
from __future__ import annotations

import click

BENCHMARKS = {
    "hessian": "bench_hessian.py",
    "eig-trigger": "bench_eig_trigger.py",
    "throughput": "bench_throughput.py",
    "resize": "bench_resize.py",
    "resize-ray": "bench_resize_ray.py",
    "resize-multihost": "bench_resize_multihost.py",
    "gns": "bench_gns.py",
    "study": "abs_study.py",
}


@click.command("bench", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name", type=click.Choice(sorted(BENCHMARKS)))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def command(name: str, args: tuple[str, ...]) -> None:
    """Run benchmark NAME with ARGS (see `hvd-abs bench NAME --help`); it prints JSON and writes
    benchmarks/results/. hessian: HVP, eigen and vector-op speed; eig-trigger: spread and cost of the
    growth trigger; throughput: samples/s vs plain Horovod; resize / resize-ray / resize-multihost: join
    stalls vs a restart (resize-multihost: on 3 namespace hosts, root, with 2-host throughput); gns: the cost of
    the gradient-noise growth trigger; study: the paper's claim on CIFAR-10."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / BENCHMARKS[name]
    if not script.exists():
        raise click.UsageError(f"{script} not found: `hvd-abs bench` runs from a source checkout "
                               f"(pip install -e .) of hvd_abs")
    sys.exit(subprocess.call([sys.executable, str(script), *args]))
