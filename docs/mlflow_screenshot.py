"""Screenshot of MLflow's compare view with the ``stats.*`` metrics of some runs (how docs/mlflow-compare.png was made).

    mlflow server --backend-store-uri sqlite:///PROJECT/mlflow.db --host 127.0.0.1 --port 5077 &
    python docs/mlflow_screenshot.py http://127.0.0.1:5077 resnet20_cifar10 generation docs/mlflow-compare.png

Picks the runs of the experiment (the model) whose tag ``dgh.kind`` is the given kind (``generation`` | ``experiment``),
opens ``#/compare-runs`` in headless Chromium (Debian package ``chromium``) over the DevTools protocol, hides the
sections other than "Run details" and "Metrics", scrolls the metrics table (react-virtualized: name and value grids
both) to the first ``stats.*`` row, and captures the page. Needs nothing beyond the standard library (a minimal
RFC 6455 client below). A dev tool, not part of the package.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROW_PX = 45  # height of one metrics-table row in MLflow 3.x's compare view


class DevTools:
    """One DevTools websocket (text frames only, client frames masked as RFC 6455 requires)."""

    def __init__(self, url: str) -> None:
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(4096)
        if b" 101 " not in buf.split(b"\r\n")[0]:
            raise ConnectionError(buf.split(b"\r\n")[0].decode())
        self.buf = buf.split(b"\r\n\r\n", 1)[1]
        self.n = 0

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                bytes([0xFE]) + struct.pack(">H", n) if n < 65536 else
                                bytes([0xFF]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _recv(self) -> str:
        msg = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            msg += self._read(n)
            if b0 & 0x80:
                return msg.decode()

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self._send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            m = json.loads(self._recv())
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")


def _rest(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


HIDE_AND_SCROLL = r"""(async (first) => {
  const header = t => [...document.querySelectorAll('div')].find(
      e => [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim() === t));
  const close = [...document.querySelectorAll('button')].find(b => b.getAttribute('aria-label') === 'Close');
  if (close) close.click();  // the assistant side panel
  for (const t of ['Visualizations', 'Parameters', 'Artifacts', 'Tags']) {
    const h = header(t);
    if (h) h.closest('.du-bois-light-collapse-item').style.display = 'none';
  }
  const grids = [...header('Metrics').closest('.du-bois-light-collapse-item').querySelectorAll('.ReactVirtualized__Grid')];
  for (const g of grids) { g.scrollTop = first; g.dispatchEvent(new Event('scroll')); }  // forward: overscan below
  await new Promise(r => setTimeout(r, 1500));
  for (const g of grids) {
    g.style.height = (g.firstElementChild.getBoundingClientRect().height - first) + 'px';
    for (let e = g.parentElement, i = 0; i < 2; i++, e = e.parentElement) e.style.height = 'auto';
    g.scrollTop = first;
  }
  return Math.ceil(grids[grids.length - 1].getBoundingClientRect().bottom + 20);
})"""


def main(server: str, experiment: str, kind: str, out: str, width: int = 1500, port: int = 9333) -> None:
    exp_id = _rest(server, f"experiments/get-by-name?experiment_name={urllib.parse.quote(experiment)}")["experiment"][
        "experiment_id"]
    runs = _rest(server, "runs/search", {"experiment_ids": [exp_id], "filter": f"tags.`dgh.kind` = '{kind}'",
                                         "max_results": 50})["runs"]
    ids = [r["info"]["run_id"] for r in runs]
    keys = sorted({m["key"] for r in runs for m in r["data"]["metrics"]}, key=str.lower)
    first = next(i for i, k in enumerate(keys) if k.startswith("stats.")) * ROW_PX
    url = (f"{server}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
           f"&experiments={urllib.parse.quote(json.dumps([exp_id]))}")
    proc = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--hide-scrollbars", f"--remote-debugging-port={port}",
                             f"--user-data-dir=/tmp/mlflow-shot-{os.getpid()}", f"--window-size={width},1400",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                    pages = [p for p in json.load(r) if p["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        tab = DevTools(pages[0]["webSocketDebuggerUrl"])
        tab.call("Page.enable")
        tab.call("Emulation.setDeviceMetricsOverride", width=width, height=1400, deviceScaleFactor=1, mobile=False)
        tab.call("Page.navigate", url=url)
        for _ in range(90):
            time.sleep(1)
            if tab.js("!!document.body && document.body.innerText.includes('Show diff only')"):
                break
        time.sleep(2)
        bottom = tab.js(f"{HIDE_AND_SCROLL}({first})")
        time.sleep(1)
        shot = tab.call("Page.captureScreenshot", format="png",
                        clip={"x": 0, "y": 0, "width": width, "height": min(int(bottom), 1400), "scale": 1})
        with open(out, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print(f"wrote {out}: {len(ids)} runs, metrics from {keys[first // ROW_PX]!r}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:5])
