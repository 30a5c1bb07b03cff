"""A tiny headless-Chromium driver for tests: the DevTools protocol over a pipe, standard library only.

    with Browser.launch() as b:
        page = b.open(Path("report.html").as_uri())
        page.evaluate("document.title")
        page.click_at(100, 200)
        page.screenshot(tmp_path / "shot.png")
        assert not page.errors

Chromium reads protocol messages on its fd 3 and writes them on fd 4, each a JSON text ended by NUL.
Every console error, uncaught exception, failed load, network request and JavaScript dialog of the
page is recorded so a test can assert that there were none.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["Browser", "Page", "BrowserError", "find_chromium"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)


class BrowserError(RuntimeError):
    pass


def find_chromium() -> Optional[str]:
    """``$REPROD_CHROMIUM`` if set, else the first Chromium or Chrome on PATH, else None."""
    env = os.environ.get("REPROD_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, proc: subprocess.Popen[bytes], to_fd: int, from_fd: int, profile: str):
        self._proc, self._to, self._from, self._profile = proc, to_fd, from_fd, profile
        self._buf = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    @classmethod
    def launch(cls, executable: Optional[str] = None, *, timeout: float = 30.0) -> Browser:
        exe = executable or find_chromium()
        if exe is None:
            raise BrowserError("no Chromium found (set REPROD_CHROMIUM or put chromium on PATH)")
        profile = tempfile.mkdtemp(prefix="reprod-chromium-")
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()

        def wire_fds() -> None:  # in the child, before exec: its fd 3 reads commands, fd 4 answers
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        proc = subprocess.Popen(
            [exe, *_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds,
            close_fds=False,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        browser = cls(proc, to_child_w, from_child_r, profile)
        try:
            browser.call("Browser.getVersion", timeout=timeout)
        except BaseException:
            browser.close()
            raise
        return browser

    # --- protocol ------------------------------------------------------------------------------
    def send(
        self, method: str, params: Optional[dict[str, Any]] = None, session: Optional[str] = None
    ) -> int:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to, data) :]
        return self._next_id

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from Chromium in time")
            ready, _, _ = select.select([self._from], [], [], left)
            if ready:
                chunk = os.read(self._from, 1 << 20)
                if not chunk:
                    raise BrowserError("Chromium closed the DevTools pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(
        self,
        method: str,
        params: Optional[dict[str, Any]] = None,
        session: Optional[str] = None,
        *,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send a command and wait for its answer; events that arrive meanwhile are kept."""
        want = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_message(deadline)
            if msg.get("id") == want:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._events.append(msg)

    def pump(self, seconds: float) -> None:
        """Collect events for a while (handlers of dialogs and the like run through this)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self._events.append(self._read_message(deadline))
        except TimeoutError:
            pass

    def take_events(self, session: str) -> list[dict[str, Any]]:
        mine = [e for e in self._events if e.get("sessionId") == session]
        self._events = [e for e in self._events if e.get("sessionId") != session]
        return mine

    def open(
        self, url: str, *, width: int = 1400, height: int = 1000, timeout: float = 60.0
    ) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(self, session, target)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        page.navigate(url, timeout=timeout)
        return page

    def close(self) -> None:
        try:
            if self._proc.poll() is None:
                try:
                    self.send("Browser.close")
                    self._proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self._proc.kill()
                    self._proc.wait(timeout=10)
        finally:
            for fd in (self._to, self._from):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One tab. ``errors`` lists console errors, uncaught exceptions and failed loads; ``requests``
    every URL the page asked for; ``dialogs`` every alert/confirm/prompt it opened."""

    def __init__(self, browser: Browser, session: str, target: str):
        self.browser, self.session, self.target = browser, session, target
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.console: list[str] = []

    def call(
        self, method: str, params: Optional[dict[str, Any]] = None, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        result = self.browser.call(method, params, self.session, timeout=timeout)
        self._digest()
        return result

    def _digest(self) -> None:
        for e in self.browser.take_events(self.session):
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled":
                text = " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])
                )
                self.console.append(f"{p.get('type')}: {text}")
                if p.get("type") in ("error", "assert"):
                    self.errors.append(f"console.{p.get('type')}: {text}")
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                desc = d.get("exception", {}).get("description") or d.get("text")
                self.errors.append(f"exception: {desc}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                self.errors.append(
                    f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip()
                )
            elif m == "Network.requestWillBeSent":
                self.requests.append(p.get("request", {}).get("url", ""))
            elif m == "Network.loadingFailed":
                self.errors.append(f"load failed: {p.get('errorText')}")
            elif m == "Page.javascriptDialogOpening":
                self.dialogs.append(p.get("message", ""))
                self.browser.send("Page.handleJavaScriptDialog", {"accept": False}, self.session)
            elif m.startswith("Page.") or m.startswith("Network."):
                self.console.append(m)

    def close(self) -> None:
        self.browser.call("Target.closeTarget", {"targetId": self.target})

    def navigate(self, url: str, *, timeout: float = 60.0) -> None:
        self.call("Page.navigate", {"url": url}, timeout=timeout)
        self.wait_for("document.readyState === 'complete'", timeout=timeout)

    def evaluate(self, expression: str, *, timeout: float = 30.0) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise), or BrowserError."""
        r = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(d.get("exception", {}).get("description") or d.get("text"))
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float = 30.0, interval: float = 0.05) -> Any:
        """Poll until the expression is truthy; its last value, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression, timeout=timeout)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout}s: {expression}")
            self.browser.pump(interval)
            self._digest()

    def settle(self, seconds: float = 0.2) -> None:
        """Let pending events (animation frames, console messages) arrive."""
        self.browser.pump(seconds)
        self._digest()

    def click_at(self, x: float, y: float) -> None:
        """A real left click at page coordinates (CSS pixels of the viewport)."""
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, clickCount=1)
        self.mouse("mouseReleased", x, y, clickCount=1)

    def drag(self, x0: float, y0: float, x1: float, y1: float, *, steps: int = 5) -> None:
        self.mouse("mouseMoved", x0, y0)
        self.mouse("mousePressed", x0, y0, clickCount=1)
        for k in range(1, steps + 1):
            self.mouse(
                "mouseMoved", x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps, buttons=1
            )
        self.mouse("mouseReleased", x1, y1, clickCount=1)

    def mouse(self, kind: str, x: float, y: float, **extra: Any) -> None:
        params = {
            "type": kind,
            "x": x,
            "y": y,
            "button": "none" if kind == "mouseMoved" else "left",
        }
        params.update(extra)
        if kind == "mouseMoved" and extra.get("buttons"):
            params["button"] = "left"
        self.call("Input.dispatchMouseEvent", params)

    def press(self, key: str) -> None:
        """Press and release a named key (``"ArrowDown"``, ``"Enter"``...) in the focused element."""
        code = {"ArrowDown": 40, "ArrowUp": 38, "Enter": 13, "Escape": 27, "Tab": 9}.get(key, 0)
        for kind in ("rawKeyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                {"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code},
            )

    def click(self, selector: str) -> None:
        """Click the centre of the first element matching a CSS selector, scrolled into view."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        if box is None:
            raise BrowserError(f"no element matches {selector!r}")
        self.click_at(*box)

    def type_text(self, selector: str, text: str) -> None:
        """Focus an input, select its content and type over it, as a user would."""
        self.click(selector)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        self.call("Input.insertText", {"text": text})

    def screenshot(self, path: str | os.PathLike[str], *, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            w, h = self.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
            )
            params["clip"] = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
        data = self.call("Page.captureScreenshot", params, timeout=60)["data"]
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return out
