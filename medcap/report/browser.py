"""A headless Chromium driven over the DevTools protocol through a pipe (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on file descriptors 3 and 4), so a report page can be opened, clicked, read and
photographed with nothing but the browser binary: no websocket client, no Python package.

    python -m medcap.report.browser outputs/demo/report.html docs/report.png --width 1280 --height 900
"""

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from medcap.atomic import replaced_atomically

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium or Chrome binary (``$CHROMIUM`` first), or None."""
    candidates = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else []
    for name in candidates + list(BROWSERS):
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page. ``open`` a file, ``evaluate`` JavaScript in it, ``click`` an element
    with real mouse events, take a ``screenshot``. Use as a context manager (the browser is closed at exit)."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 900, timeout: float = 30.0):
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError(f"no Chromium found (looked for $CHROMIUM and {', '.join(BROWSERS)})")
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="medcap-chromium-")
        args = [binary, "--headless", "--remote-debugging-pipe", f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}", "--hide-scrollbars", "--no-first-run", "--disable-gpu",
                "--disable-extensions", "--mute-audio", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to start its sandbox as root
        to_browser, self._commands = os.pipe()
        self._events, from_browser = os.pipe()

        def pipes_as_fd_3_and_4():  # the descriptors the protocol pipe uses, in the child only
            read_end, write_end = os.dup(to_browser), os.dup(from_browser)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self._process = subprocess.Popen(args, close_fds=False, preexec_fn=pipes_as_fd_3_and_4,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id = b"", 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def send(self, method: str, params: dict | None = None) -> dict:
        """Send one protocol command and return its result (events in between are dropped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._events], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise BrowserError(f"{method}: no answer within {self.timeout:.0f} s")
                chunk = os.read(self._events, 1 << 20)
                if not chunk:
                    raise BrowserError(f"{method}: the browser closed the protocol pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"JavaScript error: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None, interval: float = 0.02):
        """Poll until ``expression`` is truthy; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                value = self.evaluate(expression)
            except BrowserError as e:  # e.g. the context was replaced by a navigation in between
                value, error = None, e
            else:
                error = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression!r}" + (f" ({error})" if error else ""))
            time.sleep(interval)

    def open(self, path: str | Path, ready: str = "document.readyState === 'complete'") -> float:
        """Load a local file and wait until ``ready`` holds; returns the seconds that took."""
        start = time.perf_counter()
        self.send("Page.navigate", {"url": Path(path).resolve().as_uri()})
        self.wait_for(f"location.protocol === 'file:' && ({ready})")
        return time.perf_counter() - start

    def click(self, selector: str) -> None:
        """Scroll the first element matching ``selector`` into view and click its centre with the mouse."""
        box = self.evaluate(f"""(() => {{
            const element = document.querySelector({json.dumps(selector)});
            if (!element) return null;
            element.scrollIntoView({{block: 'center'}});
            const r = element.getBoundingClientRect();
            return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
        }})()""")
        if box is None:
            raise BrowserError(f"no element matches {selector!r}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"], "button": "left",
                                                   "clickCount": 1})

    def type_text(self, selector: str, text: str) -> None:
        """Focus an input and type ``text`` into it as key presses would."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: str | Path | None = None, full_page: bool = False) -> bytes:
        """A PNG of the viewport (or, with ``full_page``, of the whole page); written to ``path`` if given."""
        params = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        png = base64.b64decode(self.send("Page.captureScreenshot", params)["data"])
        if path is not None:
            with replaced_atomically(path) as tmp:
                tmp.write_bytes(png)
        return png

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for fd in (self._commands, self._events):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", help="an HTML file, e.g. outputs/demo/report.html")
    parser.add_argument("png", help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    with Chromium(width=args.width, height=args.height) as browser:
        seconds = browser.open(args.page, "document.body && document.body.dataset.ready === '1'")
        browser.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        browser.screenshot(args.png)
    print(f"{args.png}: {args.page} opened in {seconds:.2f} s")


if __name__ == "__main__":
    main()
