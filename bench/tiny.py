"""`python -m bench.tiny`: only the tiny-images figure of `make bench`, on SQLite with the
in-process runner, for a quick comparison of two checkouts (run it in each, one after
the other, on a quiet machine). BENCH_TINY and BENCH_RUNS as for the whole bench."""

import io
import tempfile
from pathlib import Path

from PIL import Image

from bench.__main__ import (
    Bench,
    Configuration,
    LocalServer,
    Params,
    WebhookReceiver,
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
            figures = tiny_runs(service, bench)
    say(f"tiny 64x64 images per second: {figures['per_second']}")


if __name__ == "__main__":
    main()
