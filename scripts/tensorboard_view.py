"""What TensorBoard shows of a folder of runs, checked and photographed without a person at a screen.

    python scripts/tensorboard_view.py runs                       # the runs and their tags, as TensorBoard serves them
    python scripts/tensorboard_view.py runs --shot scalars.png    # and a headless Chromium screenshot of a page

It starts `tensorboard --logdir FOLDER` on 127.0.0.1 (a free port), asks its HTTP data API which
runs and tags it found (the same lists its pages draw), optionally takes a screenshot of the
scalars or hparams page with Debian's `chromium`, and stops the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulation.launch import free_port  # noqa: E402

# The legacy scalars page takes a tag filter in its address; the hparams page is the table of runs.
PAGES = {"scalars": "#scalars&_smoothingWeight=0&tagFilter={tags}", "hparams": "#hparams"}


def get(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


@contextlib.contextmanager
def serve(logdir: Path, *, timeout: float = 120.0) -> Iterator[str]:
    """A TensorBoard on 127.0.0.1 over `logdir`, once it answers; its base URL. Stopped on leaving."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port), "--load_fast", "false", "--reload_interval", "1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"tensorboard exited ({server.returncode}): {server.stderr.read()[-2000:]}")
            try:
                get(f"{url}/data/runs")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensorboard did not answer on {url} within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def scalar_tags(url: str, *, expect: int = 1, timeout: float = 60.0) -> dict[str, list[str]]:
    """Each run's scalar tags as TensorBoard serves them, once it has loaded at least `expect` runs."""
    deadline = time.monotonic() + timeout
    while True:
        tags = {run: sorted(found) for run, found in get(f"{url}/data/plugin/scalars/tags").items() if found}
        if len(tags) >= expect or time.monotonic() > deadline:
            return tags
        time.sleep(1)


def hparams_runs(url: str) -> list[str]:
    """The runs in the hparams table (each a session group of one run)."""
    experiment = get(f"{url}/data/plugin/hparams/session_groups", {"experimentName": "", "allowedStatuses": [
        "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"], "colParams": [], "startIndex": 0,
        "sliceSize": 1000})
    return sorted(group["name"] for group in experiment.get("sessionGroups", []))


def screenshot(url: str, path: Path, *, page: str = "scalars", tags: str = "perplexity", width: int = 1600,
               height: int = 1000) -> Path:
    """A headless Chromium screenshot of one of TensorBoard's pages (the scalars page shows the tags matching `tags`)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", "--virtual-time-budget=20000", f"--screenshot={path}",
                    f"{url}/{PAGES[page].format(tags=urllib.parse.quote(tags, safe=''))}"], check=True, capture_output=True, timeout=180)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--shot", type=Path, help="write a screenshot of --page here")
    parser.add_argument("--page", choices=sorted(PAGES), default="scalars")
    parser.add_argument("--tags", default="perplexity", help="the scalars page shows the tags this regex matches")
    args = parser.parse_args(argv)
    with serve(args.logdir) as url:
        for run, tags in scalar_tags(url).items():
            print(f"{run}: {len(tags)} scalar tags: {', '.join(tags[:8])}{' ...' if len(tags) > 8 else ''}")
        if args.shot:
            print(f"screenshot of the {args.page} page: {screenshot(url, args.shot, page=args.page, tags=args.tags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
