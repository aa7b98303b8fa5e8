"""`python -m bench.cpu`: where a tiny image's CPU goes, process by process.

Starts the service (SQLite, in-process runner, the default image processes) against a
local image server in this process, runs BENCH_CPU_RUNS batches of BENCH_TINY tiny images
(64x64 JPEGs, new URLs each batch), and prints for each batch its images per second and
the CPU milliseconds per image of each process, read from /proc/PID/stat before and after:
the web process, the image processes together, and this process (the origin server and
the webhook receiver). With 2 cores, images per second can reach at most
2000 / (the sum of the three) while the cores are busy all the time; the share of the
cores the batch kept busy is printed too.
"""

import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from bench.__main__ import (
    Bench,
    Configuration,
    Params,
    child_pids,
    csv_bytes,
    env_int,
    run_batch,
    running_service,
    say,
    service_env,
)
from tests.support.servers import LocalServer, WebhookReceiver

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def main() -> None:
    runs, count = env_int("BENCH_CPU_RUNS", 5), env_int("BENCH_TINY", 3000)
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    tiny = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(tiny, "JPEG", quality=90)
    with LocalServer() as images, WebhookReceiver() as receiver:
        urls = [images.add(tiny.getvalue()) for _ in range(count)]
        bench = Bench(Params.from_env(), work, [], urls, images, receiver, None, "")  # type: ignore[arg-type]
        config = Configuration("sqlite", "inprocess", f"sqlite:///{work / 'bench.db'}")
        with running_service(service_env(bench, config), work / config.slug) as service:
            run_batch(service, csv_bytes([f"{url}?warm" for url in urls[:300]], 3), receiver)
            web = service.process.pid
            for run in range(runs):
                image_pids = child_pids(web)
                before = {pid: cpu_seconds(pid) for pid in [web, os.getpid(), *image_pids]}
                elapsed, _ = run_batch(service, csv_bytes([f"{url}?cpu={run}" for url in urls], 3), receiver)
                spent = {pid: cpu_seconds(pid) - seconds for pid, seconds in before.items()}
                web_ms = spent.pop(web) * 1000 / count
                origin_ms = spent.pop(os.getpid()) * 1000 / count
                image_ms = sum(spent.values()) * 1000 / count
                busy = (web_ms + image_ms + origin_ms) * count / 1000 / elapsed
                say(
                    f"run {run + 1}: {count / elapsed:.0f} images/s; CPU ms per image: web {web_ms:.2f}, "
                    f"image processes {image_ms:.2f}, origin and receiver {origin_ms:.2f}; "
                    f"{busy:.2f} cores busy"
                )


if __name__ == "__main__":
    main()
