"""`python -m bench.tiny`: only the tiny-images figure of `make bench`, on SQLite with the
in-process runner, for a quick comparison of two checkouts (run it in each, one after
the other, on a quiet machine). BENCH_TINY and BENCH_RUNS as for the whole bench.

It also prints the CPU time the service spent per image (the web process and its image
processes, over the timed runs): on a machine shared with other work the rate moves with
the load, the CPU per image much less."""

import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from bench.__main__ import (
    Bench,
    Configuration,
    LocalServer,
    Params,
    WebhookReceiver,
    child_pids,
    running_service,
    say,
    service_env,
    tiny_runs,
)


def main() -> None:
    params = Params.from_env()
    work = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    tiny = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(tiny, "JPEG", quality=90)
    with LocalServer() as images_server, WebhookReceiver() as receiver:
        bench = Bench(
            params=params,
            work=work,
            photo_urls=[],
            tiny_urls=[images_server.add(tiny.getvalue()) for _ in range(params.tiny)],
            images_server=images_server,
            receiver=receiver,
            ceiling=None,
            broker_url="",
        )
        config = Configuration("sqlite", "inprocess", f"sqlite:///{work / 'bench.db'}")
        with running_service(service_env(bench, config), work / "service") as service:
            before = cpu_seconds(service.process.pid)
            figures = tiny_runs(service, bench)
            web, processes = (
                after - start for after, start in zip(cpu_seconds(service.process.pid), before, strict=True)
            )
    images = figures["images"] * params.runs
    say(f"tiny 64x64 images per second: {figures['per_second']}")
    say(
        f"service CPU per image: {1000 * (web + processes) / images:.2f} ms "
        f"(web process {1000 * web / images:.2f}, image processes {1000 * processes / images:.2f})"
    )


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the process and of its children, so far."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(of: int) -> float:
        try:
            fields = Path(f"/proc/{of}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a process that just ended
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick

    return used(pid), sum(used(child) for child in child_pids(pid))


if __name__ == "__main__":
    main()
